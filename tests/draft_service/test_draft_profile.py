"""The draft's cost table: profile_draft on the tiny draft's ORT graph, and the service's --cost-table / cache /
profile."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from cast.v1 import draft_pb2, draft_pb2_grpc
from cast_core.cost_table import CostTable
from cast_runtime.profiling import ProfileGrid, save
from cast_runtime.wire import cost_table_from_proto
from draft_service import profile as dp
from draft_service.config import DraftConfig
from verify_service.config import VerifyConfig
from draft_service.server import start_server

GRID = ProfileGrid(batch_sizes=(1, 3), context_buckets=(8, 5000), token_counts=(1, 6), repeats=2, warmup=1)


def test_profile_draft_measures_every_cell_of_the_capped_grid(runner):
    cells = []
    profile = dp.profile_draft(runner, GRID, model_id="tiny", on_cell=lambda *cell: cells.append(cell))
    table = profile.table
    last = runner.meta.max_context - 1  # 5000 is past the model's positions: that bucket becomes its last one
    assert (table.batch_sizes, table.context_buckets, table.token_counts) == ((1, 3), (8, last), (1, 6))
    assert table.millis.shape == (2, 2, 2) and np.all(table.millis > 0)
    assert (table.device, table.model_id, table.dtype) == ("cpu", "tiny", "float32")
    assert [c[:3] for c in cells] == [(b, c, n) for c in (8, last) for b in (1, 3) for n in (1, 6)]
    assert profile.forwards == 8 * (2 + 2) and profile.seconds > 0  # repeats + warm-up (at least 2) per cell


def test_tree_rows_show_the_past_the_ancestors_and_itself(runner):
    from draft_service.export import ROW_FIELDS

    rows = dp.tree_rows(runner, 3, 2, 4, np.random.default_rng(0))  # nodes 0 <- 1, 2; 1 <- 3 after 2 tokens
    assert rows.shape == (3, 4, runner.width)
    assert rows[..., 1].tolist() == [[2, 3, 3, 4]] * 3, "position: the context, then each node's depth"
    assert rows[..., 2].tolist() == [[2, 3, 4, 5]] * 3 and (rows[..., 3] == 2).all()
    visible = [set(rows[0, i, ROW_FIELDS:].tolist()) for i in range(4)]
    assert visible == [{2}, {2, 3}, {2, 4}, {2, 3, 5}]


def test_default_grids():
    assert dp.GPU_GRID.batch_sizes == (1, 2, 4, 8, 16, 32) and dp.GPU_GRID.token_counts[-1] == 64
    assert dp.QUICK_GRID.cells <= 12
    slots = next(f.default for f in dataclasses.fields(VerifyConfig) if f.name == "max_batch")
    assert dp.STARTUP_GRID.batch_sizes[-1] == slots  # priced up to the largest batch of a default verifier
    assert dp.device_name("CPUExecutionProvider") == "cpu"


# ---- the service -------------------------------------------------------------------------------------------------


def config_for(draft_model_dir, cache_dir, **overrides) -> DraftConfig:
    return DraftConfig(model=draft_model_dir, host="127.0.0.1", port=0, provider="cpu", cache_dir=cache_dir,
                       **overrides)


async def describe(config: DraftConfig):
    server, port = await start_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = draft_pb2_grpc.DraftServiceStub(channel)
            return (await stub.Describe(draft_pb2.DraftDescribeRequest())).replica
    finally:
        await server.stop(None)


@pytest.fixture
def fresh_cache_entry(runner, draft_model_dir, onnx_cache_dir):
    """The draft's cost-table cache entry, removed before and after (the export cache is shared by the session)."""
    path = dp.draft_cache_path(runner, draft_model_dir, onnx_cache_dir)
    path.unlink(missing_ok=True)
    yield path
    path.unlink(missing_ok=True)


async def test_describe_returns_a_start_up_profile_and_a_second_start_reuses_its_cache(
    draft_model_dir, onnx_cache_dir, exported, fresh_cache_entry
):
    replica = await describe(config_for(draft_model_dir, onnx_cache_dir))
    table = cost_table_from_proto(replica.cost_table)
    grid = dp.STARTUP_GRID
    assert (table.batch_sizes, table.context_buckets, table.token_counts) == (
        grid.batch_sizes, grid.context_buckets, grid.token_counts)
    assert np.all(table.millis > 0)
    assert (table.device, table.dtype) == (replica.device, replica.dtype) == ("cpu", "float32")
    assert table.model_id.startswith(f"{replica.model_name}@cfg:")
    assert fresh_cache_entry.is_file()
    # A recognisable table in the cache entry: a second start must serve it rather than profile again.
    marker = CostTable.linear(1.0, 2.0, token_counts=(1, 2, 4), device="cpu", model_id=table.model_id)
    save(marker, fresh_cache_entry)
    again = await describe(config_for(draft_model_dir, onnx_cache_dir))
    assert cost_table_from_proto(again.cost_table) == marker


async def test_cost_table_flag_is_served_as_given(draft_model_dir, onnx_cache_dir, exported, fresh_cache_entry,
                                                  tmp_path):
    given = CostTable.linear(0.25, 1.0, batch_sizes=(1, 4), context_buckets=(32, 512), token_counts=(1, 8),
                             device="NVIDIA L4", model_id="elsewhere", dtype="float16")
    path = tmp_path / "draft.json"
    save(given, path)
    replica = await describe(config_for(draft_model_dir, onnx_cache_dir, cost_table=path))
    assert cost_table_from_proto(replica.cost_table) == given
    assert not fresh_cache_entry.exists()


async def test_no_profile_serves_no_table(draft_model_dir, onnx_cache_dir, exported, fresh_cache_entry):
    replica = await describe(config_for(draft_model_dir, onnx_cache_dir, profile=False))
    assert cost_table_from_proto(replica.cost_table) is None
    assert not fresh_cache_entry.exists()


def test_cost_table_and_profile_flags_and_environment(draft_model_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "t.json"
    save(CostTable.linear(1.0, 1.0), path)
    model = ["--model", str(draft_model_dir)]
    config = DraftConfig.from_args([*model, "--cost-table", str(path)])
    assert config.cost_table == path and config.profile is True
    assert DraftConfig.from_args([*model, "--no-profile"]).profile is False
    monkeypatch.setenv("CAST_DRAFT_COST_TABLE", str(path))
    monkeypatch.setenv("CAST_DRAFT_PROFILE", "off")
    config = DraftConfig.from_args(model)
    assert (config.cost_table, config.profile) == (path, False)
    with pytest.raises(SystemExit):
        DraftConfig.from_args([*model, "--cost-table", str(tmp_path / "missing.json")])
    assert "cost_table" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        DraftConfig.from_args([*model, "--profile", "maybe"])
