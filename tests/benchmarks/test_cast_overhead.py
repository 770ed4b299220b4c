"""`python -m benchmarks.cast_overhead`: a row per batch size, with the shape of its trees and digests that two code
versions compare."""

from __future__ import annotations

import json

from benchmarks import cast_overhead


def test_cast_overhead_writes_a_row_per_batch_and_times_the_same_trees_again(tiny_pair, tmp_path, capsys):
    out = tmp_path / "overhead.json"
    assert cast_overhead.main(["--model", str(tiny_pair[1]), "--batch", "1,2", "--context", "24", "--repeats", "3",
                               "--warmup", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        # The replay forwarded the same rows and returned the same trees as the real call (checked inside), and the
        # tree is CAST's: trimmed to what the planner asked, several layers.
        assert r["returned"] <= 48 and r["layers"] >= 2 and r["candidates"] > r["returned"]
        assert r["draft_model_ms"] > 0 and r["draft_replay_cpu_ms"] > 0 and r["orch_cpu_ms"] > 0
        assert len(r["returned_digest"]) == len(r["verified_digest"]) == 16
    assert "digests" in capsys.readouterr().out
