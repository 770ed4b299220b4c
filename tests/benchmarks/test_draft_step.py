"""`python -m benchmarks.draft_step`: one row per cell, the tree it times, both buffer modes and both tree rules."""

from __future__ import annotations

import json

from benchmarks import draft_step


def test_draft_step_writes_a_row_per_buffer_mode_and_batch(tiny_pair, tmp_path, capsys):
    out = tmp_path / "step.json"
    code = draft_step.main(["--model", str(tiny_pair[1]), "--provider", "cpu", "--batch", "1,2", "--depth", "3",
                            "--top-k", "8", "--breadth", "2", "--context", "16", "--buffers", "fixed,growing",
                            "--repeats", "3", "--warmup", "1", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert (result["provider"], result["dtype"], result["device"]) == ("CPUExecutionProvider", "float32", "cpu")
    rows = result["rows"]
    assert [(r["buffers"], r["batch"]) for r in rows] == [("fixed", 1), ("fixed", 2), ("growing", 1), ("growing", 2)]
    assert all(r["median_ms"] > 0 and r["layers"] == 3 and r["nodes_per_tree"] == 1 + 8 + 16 + 16 for r in rows)
    assert "median ms" in capsys.readouterr().out


def test_draft_step_times_cast_rules_on_the_same_tree(tiny_pair, tmp_path):
    out = tmp_path / "rules.json"
    assert draft_step.main(["--model", str(tiny_pair[1]), "--provider", "cpu", "--batch", "2", "--depth", "3",
                            "--top-k", "8", "--breadth", "2", "--context", "16", "--rules", "eagle2,cast",
                            "--repeats", "2", "--warmup", "1", "--out", str(out)]) == 0
    eagle2, cast = json.loads(out.read_text())["rows"]
    assert (eagle2["rules"], cast["rules"]) == ("eagle2", "cast")
    assert (cast["nodes_per_tree"], cast["layers"]) == (eagle2["nodes_per_tree"], eagle2["layers"]) == (41, 3)
