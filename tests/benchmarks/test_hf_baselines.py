"""benchmarks.hf_baselines on CPU with the tiny random pair: every mode runs, and greedy assisted == plain generate."""

from __future__ import annotations

import json

from benchmarks import hf_baselines


def test_tool_runs_and_assisted_is_lossless(tiny_pair, tmp_path):
    target, draft = tiny_pair
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    rc = hf_baselines.main([
        "--target", str(target), "--draft", str(draft), "--prompts", "2", "--max-new-tokens", "8",
        "--batch", "1,8", "--dtype", "float32", "--device", "cpu", "--out", str(out), "--md", str(md),
    ])
    assert rc == 0
    report = json.loads(out.read_text())
    modes = {(r["mode"], r["batch"]) for r in report["rows"]}
    assert modes == {("generate", 1), ("assisted", 1), ("generate", 8)}
    for r in report["rows"]:
        assert r["tokens"] == r["prompts"] * 8 and r["tokens_per_s"] > 0 and r["median_request_s"] > 0
    assisted = next(r for r in report["rows"] if r["mode"] == "assisted")
    assert assisted["target_forwards"] >= 2 and assisted["tokens_per_target_forward"] >= 1
    assert report["checks"]["assisted_vs_generate_mismatches"] == 0
    assert report["checks"]["batch_vs_batch1_mismatches"] == {"8": 0}
    assert report["assisted"]["batch_sizes"] == [1] and report["assisted"]["settings"]["num_assistant_tokens"] == 20
    assert report["torch"] and report["transformers"] and report["device"]
    assert "| assisted | 1 |" in md.read_text()


def test_new_tokens_cuts_at_first_eos():
    import torch

    out = torch.tensor([[5, 6, 1, 0, 0, 0], [5, 6, 1, 2, 3, 4]])
    assert hf_baselines.new_tokens(out, 2, eos_id=0) == [[1, 0], [1, 2, 3, 4]]
