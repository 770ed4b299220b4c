"""`python -m benchmarks.shared_weights`: memory at start and after the warm-up, the weights read once, a step time."""

from __future__ import annotations

import json

from benchmarks import shared_weights
from draft_service.export import export_draft


def test_shared_weights_reports_the_warmed_sessions_on_one_copy_of_the_weights(tiny_pair, tmp_path, capsys):
    onnx_path, _ = export_draft(tiny_pair[1], top_k=8, dtype="float32")
    out = tmp_path / "shared.json"
    assert shared_weights.main(["--model", str(onnx_path.parent), "--provider", "cpu", "--batches", "1,2",
                                "--depth", "3", "--breadth", "2", "--context", "16", "--repeats", "2",
                                "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "onnxruntime:CPUExecutionProvider+static"
    assert result["bucket_sessions"] == 2 * 7 and result["weight_tensors"] > 0 and result["weights_mib"] > 0
    assert set(result["memory_mib"]) == {"before", "started", "warm"} and result["kv_mib"] > 0
    assert result["step"]["median_ms"] > 0 and result["step"]["nodes_per_tree"] == 1 + 8 + 16 + 16
    assert "per bucket session" in capsys.readouterr().out
