"""The verifier's cost table: profile_verifier on the tiny target, and the service's --cost-table / cache / profile."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from cast.v1 import verify_pb2, verify_pb2_grpc
from cast_core.cost_table import CostTable
from cast_runtime.profiling import ProfileGrid, save
from cast_runtime.wire import cost_table_from_proto
from verify_service import profile as vp
from verify_service.config import VerifyConfig
from verify_service.server import start_server
from verify_service.target import TargetModel
from verify_service.verifier import Verifier

GRID = ProfileGrid(batch_sizes=(1, 3), context_buckets=(16, 5000), token_counts=(1, 5), repeats=2, warmup=1)


@pytest.fixture(scope="module")
def target32(tiny_pair) -> TargetModel:
    return TargetModel.load(tiny_pair[0], dtype="float32", device="cpu", max_context=64)


@pytest.fixture
def verifier32(target32) -> Verifier:
    return Verifier(target32, max_batch=4, session_ttl_s=60, max_tree_tokens=8)


def test_profile_verifier_measures_every_cell_of_the_capped_grid(verifier32):
    cells = []
    profile = vp.profile_verifier(verifier32, GRID, model_id="tiny", on_cell=lambda *cell: cells.append(cell))
    table = profile.table
    # 5000 is past the service's 64 positions: that bucket becomes its last position.
    assert (table.batch_sizes, table.context_buckets, table.token_counts) == ((1, 3), (16, 63), (1, 5))
    assert table.millis.shape == (2, 2, 2) and np.all(table.millis > 0)
    assert (table.device, table.model_id, table.dtype) == ("cpu", "tiny", "float32")
    assert [c[:3] for c in cells] == [(b, c, n) for c in (16, 63) for b in (1, 3) for n in (1, 5)]
    assert profile.forwards == 2 + 8 * 3  # one prefill per context bucket, then warm-up + repeats per cell
    assert profile.seconds > 0
    assert verifier32.kv.owners == []  # the profile's sequences are gone


def test_the_grid_is_capped_by_what_the_verifier_serves_and_so_is_the_cache_entry(target32, verifier32, tiny_pair):
    verifier = Verifier(target32, max_batch=2, session_ttl_s=60, max_tree_tokens=4)
    timed = []
    real = verifier.static.tree_logits
    verifier.static.tree_logits = lambda kvs, trees: timed.append(len(kvs)) or real(kvs, trees)
    grid = ProfileGrid(batch_sizes=(1, 2, 3), context_buckets=(16,), token_counts=(1, 4, 8), repeats=1, warmup=1)
    table = vp.profile_verifier(verifier, grid, model_id="tiny").table
    # 2 slots, trees of at most 4 nodes: no batch or tree it cannot serve.
    assert (table.batch_sizes, table.token_counts) == ((1, 2), (1, 4)) and np.all(table.millis > 0)
    assert sorted(set(timed)) == [1, 2] and verifier.kv.owners == []
    # A service with more slots or tree room must not be served this table from the cache.
    model = tiny_pair[0]
    assert vp.verifier_cache_path(verifier, model) != vp.verifier_cache_path(verifier32, model)
    same = Verifier(target32, max_batch=2, session_ttl_s=1, max_tree_tokens=4)
    assert vp.verifier_cache_path(same, model) == vp.verifier_cache_path(verifier, model)


def test_a_timed_forward_leaves_the_kv_at_its_context(verifier32):
    generator = torch.Generator().manual_seed(0)
    kvs = vp.prefilled_batch(verifier32, 10, 3, generator)
    store = verifier32.kv
    assert [kv.length for kv in kvs] == [10, 10, 10] and [kv.slot for kv in kvs] == [0, 1, 2]
    for layer in store.layers:  # every slot holds the one prefill
        assert torch.equal(layer.keys[1, :, :10], layer.keys[0, :, :10])
        assert torch.equal(layer.values[2, :, :10], layer.values[0, :, :10])
    before = [layer.keys[:3, :, :10].clone() for layer in store.layers]
    vp.time_tree_forward(verifier32.static, kvs, 7, GRID, generator)
    assert [kv.length for kv in kvs] == [10, 10, 10]
    assert all(torch.equal(layer.keys[:3, :, :10], keys) for layer, keys in zip(store.layers, before))


def test_profile_tree_is_a_binary_tree():
    tree = vp.profile_tree(7)
    tree.validate()
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 2] and tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 2]


def test_default_grids_cover_the_orchestrators_lookups():
    gpu = vp.default_grid(torch.device("cuda"))
    assert gpu.batch_sizes == (1, 2, 4, 8, 16, 32) and gpu.token_counts[-1] == 128
    assert vp.default_grid(torch.device("cpu")).cells < gpu.cells
    assert vp.QUICK_GRID.cells <= 12


# ---- the service -------------------------------------------------------------------------------------------------


def config_for(tiny_pair, **overrides) -> VerifyConfig:
    settings = dict(model=tiny_pair[0], host="127.0.0.1", port=0, dtype="float32", device="cpu")
    return VerifyConfig(**(settings | overrides))


async def describe(config: VerifyConfig):
    server, port = await start_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = verify_pb2_grpc.VerifyServiceStub(channel)
            return (await stub.Describe(verify_pb2.VerifyDescribeRequest())).replica
    finally:
        await server.stop(None)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CAST_CACHE_DIR", str(tmp_path))
    return tmp_path


async def test_the_start_up_profile_reaches_the_largest_batch_the_service_runs(tiny_pair, cache_dir):
    """Past a table's last batch size a lookup clamps: a verifier of 12 slots priced at batch 8 would be priced low
    for every step at batch 9-12."""
    table = cost_table_from_proto((await describe(config_for(tiny_pair, max_batch=12))).cost_table)
    assert table.batch_sizes == (1, 2, 4, 8, 12)


async def test_describe_returns_a_start_up_profile_and_a_second_start_reuses_its_cache(tiny_pair, cache_dir):
    replica = await describe(config_for(tiny_pair))
    table = cost_table_from_proto(replica.cost_table)
    grid = vp.STARTUP_GRID
    assert (table.batch_sizes, table.context_buckets, table.token_counts) == (
        grid.batch_sizes, grid.context_buckets, grid.token_counts)
    assert np.all(table.millis > 0)
    assert (table.device, table.dtype) == (replica.device, replica.dtype) == ("cpu", "float32")
    assert table.model_id.startswith("target@cfg:")
    [cached] = (cache_dir / "cost-tables").glob("verify-target-*.json")
    # Put a recognisable table in the cache entry: a second start must serve it rather than profile again.
    marker = CostTable.linear(1.0, 2.0, token_counts=(1, 2, 4), device="cpu", model_id=table.model_id)
    save(marker, cached)
    again = cost_table_from_proto((await describe(config_for(tiny_pair))).cost_table)
    assert again == marker
    # Another dtype is another entry.
    await describe(config_for(tiny_pair, dtype="float64"))
    assert len(list((cache_dir / "cost-tables").glob("verify-target-*.json"))) == 2


async def test_cost_table_flag_is_served_as_given(tiny_pair, cache_dir, tmp_path):
    given = CostTable.linear(0.5, 4.0, batch_sizes=(1, 8), context_buckets=(64, 256), token_counts=(1, 2, 4, 8),
                             device="NVIDIA H100 80GB HBM3", model_id="elsewhere", dtype="bfloat16")
    path = tmp_path / "verify.json"
    save(given, path)
    replica = await describe(config_for(tiny_pair, cost_table=path))
    assert cost_table_from_proto(replica.cost_table) == given
    assert not (cache_dir / "cost-tables").exists()  # nothing profiled, nothing cached


async def test_no_profile_serves_no_table(tiny_pair, cache_dir):
    replica = await describe(config_for(tiny_pair, profile=False))
    assert cost_table_from_proto(replica.cost_table) is None
    assert not (cache_dir / "cost-tables").exists()


def test_cost_table_and_profile_flags_and_environment(tiny_pair, tmp_path, capsys):
    path = tmp_path / "t.json"
    save(CostTable.linear(1.0, 1.0), path)
    model = ["--model", str(tiny_pair[0])]
    config = VerifyConfig.from_args([*model, "--cost-table", str(path)], environ={})
    assert config.cost_table == path and config.profile is True
    assert VerifyConfig.from_args([*model, "--no-profile"], environ={}).profile is False
    env = {"CAST_VERIFY_COST_TABLE": str(path), "CAST_VERIFY_PROFILE": "0"}
    config = VerifyConfig.from_args(model, environ=env)
    assert (config.cost_table, config.profile) == (path, False)
    assert VerifyConfig.from_args(model, environ={}).cost_table is None
    with pytest.raises(SystemExit):
        VerifyConfig.from_args([*model, "--cost-table", str(tmp_path / "missing.json")], environ={})
    assert "cost_table" in capsys.readouterr().err
