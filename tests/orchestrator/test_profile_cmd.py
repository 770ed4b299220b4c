"""`cast profile verify|draft`: a quick profile writes a loadable table, a plot, and by default the services' cache
entry."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cast.v1 import verify_pb2
from cast_runtime.profiling import load
from cast_runtime.wire import cost_table_from_proto
from orchestrator.cli import main
from verify_service.config import VerifyConfig
from verify_service.profile import QUICK_GRID
from verify_service.server import start


def run_cast(*argv: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 0


def test_profile_verify_quick_writes_a_table_and_a_plot(tiny_pair, tmp_path, capsys):
    out, png = tmp_path / "verify.json", tmp_path / "verify.png"
    run_cast("profile", "verify", "--quick", "--model", str(tiny_pair[0]), "--out", str(out), "--plot", str(png),
             "--no-progress")
    table = load(out)
    assert (table.batch_sizes, table.context_buckets, table.token_counts) == (
        QUICK_GRID.batch_sizes, QUICK_GRID.context_buckets, QUICK_GRID.token_counts)
    assert np.all(table.millis > 0) and (table.device, table.dtype) == ("cpu", "float32")
    assert table.model_id.startswith("target@cfg:")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "forwards" in printed


def test_profile_draft_quick_with_a_grid_lands_where_the_service_looks(tiny_pair, tmp_path, capsys):
    # Its own cache dir: the session's is where the integration stacks' services look for their tables.
    run_cast("profile", "draft", "--quick", "--model", str(tiny_pair[1]), "--provider", "cpu", "--batch-sizes", "1,2",
             "--token-counts", "1,3", "--repeats", "1", "--warmup", "0", "--no-progress", "--cache-dir", str(tmp_path))
    written = capsys.readouterr().out.split("wrote ")[1].split()[0]
    assert written.startswith(str(tmp_path / "cost-tables" / "draft-draft-"))
    table = load(written)
    assert (table.batch_sizes, table.token_counts) == ((1, 2), (1, 3))


def test_profile_without_a_role_prints_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile"])
    assert exit_info.value.code == 2 and "cast profile verify" in capsys.readouterr().err


def test_a_service_started_after_cast_profile_serves_its_table(tiny_pair, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAST_CACHE_DIR", str(tmp_path))
    run_cast("profile", "verify", "--quick", "--model", str(tiny_pair[0]), "--no-progress", "--max-batch", "4")
    written = load(capsys.readouterr().out.split("wrote ")[1].split()[0])

    async def served(max_batch: int):
        running = await start(VerifyConfig(model=tiny_pair[0], host="127.0.0.1", port=0, device="cpu",
                                           max_batch=max_batch))
        try:
            return (await running.servicer.Describe(verify_pb2.VerifyDescribeRequest(), None)).replica.cost_table
        finally:
            await running.server.stop(None)

    table = cost_table_from_proto(asyncio.run(served(4)))
    assert table.token_counts == written.token_counts  # the quick grid, not the start-up one
    assert np.allclose(table.millis, written.millis, rtol=1e-6)  # the proto carries float32
    # Fewer slots cap the grid: such a service profiles a table of its own rather than take this one.
    other = cost_table_from_proto(asyncio.run(served(2)))
    assert other.token_counts != written.token_counts and max(other.batch_sizes) <= 2
