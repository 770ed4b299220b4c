"""The exported graph matches PyTorch on a tree with past KV, and the export cache hits on the second call."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from draft_service import export as export_mod
from draft_service.export import _load_model, _wrapper, export_draft, io_names, sample_inputs


def test_ort_topk_matches_torch_on_a_tree_with_past(exported, runner, draft_model_dir):
    _, meta = exported
    dims = {n: getattr(meta, n) for n in ("num_layers", "num_kv_heads", "head_dim", "vocab_size")}
    # Sizes unlike the export's sample (B=2, P=3, T=4): the dims are really dynamic.
    feeds = sample_inputs(dims, "float32", batch=3, past_len=5, new=7, seed=42)
    model = _load_model(draft_model_dir, "float32")
    inputs, _ = io_names(meta.num_layers)
    with torch.no_grad():
        want = _wrapper(model, meta.top_k)(*(torch.from_numpy(feeds[n]) for n in inputs))
    layers = range(meta.num_layers)
    past = [feeds[f"past.{l}.key"] for l in layers], [feeds[f"past.{l}.value"] for l in layers]
    got = runner.run(feeds["input_ids"], feeds["position_ids"], feeds["attention_mask"], *past)
    assert got.probs.shape == got.ids.shape == (3, 7, meta.top_k)
    np.testing.assert_array_equal(got.ids, want[1].numpy())
    np.testing.assert_allclose(got.probs, want[0].numpy(), atol=1e-4)
    assert (np.diff(got.probs, axis=-1) <= 0).all(), "top-K comes sorted, best first"
    for have, expected in zip(got.keys, want[2::2]):
        assert have.shape == (3, meta.num_kv_heads, 5 + 7, meta.head_dim)
        np.testing.assert_allclose(have, expected.numpy(), atol=1e-4)


def test_second_export_is_a_cache_hit(exported, draft_model_dir, monkeypatch):
    path, meta = exported
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(export_mod, "_export", lambda *a, **k: pytest.fail("re-exported on a cache hit"))
    t0 = time.perf_counter()
    again, meta_again = export_draft(draft_model_dir, top_k=8, dtype="float32")
    assert time.perf_counter() - t0 < 1.0
    assert again == path and path.stat().st_mtime_ns == mtime and meta_again == meta


def test_cache_key_covers_k_dtype_and_checkpoint(draft_model_dir, tmp_path):
    key = export_mod.export_key(draft_model_dir, 8, "float32")
    assert key == export_mod.export_key(draft_model_dir, 8, "float32")
    assert key != export_mod.export_key(draft_model_dir, 4, "float32")
    assert key != export_mod.export_key(draft_model_dir, 8, "float16")
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for f in draft_model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert export_mod.export_key(copy, 8, "float32") == key, "the key is the content, not the path"
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert export_mod.export_key(copy, 8, "float32") != key


def test_export_rejects_bad_options(draft_model_dir):
    with pytest.raises(ValueError, match="dtype"):
        export_draft(draft_model_dir, dtype="bfloat13")
    with pytest.raises(ValueError, match="top_k"):
        export_draft(draft_model_dir, top_k=0)


def test_onnx_runtime_fuses_every_rms_norm(exported, tmp_path):
    """A draft forward on the CUDA provider is launch-bound: each RMSNorm must reach ONNX Runtime in the form it
    fuses into one node (2 per decoder layer and the final one), and the model's own modules are left as they were."""
    import onnx
    import onnxruntime as ort

    path, meta = exported
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node]
    assert ops.count("SimplifiedLayerNormalization") == 2 * meta.num_layers + 1
    assert "Reciprocal" not in ops and "ReduceMean" not in ops


def test_fusable_rms_norms_computes_the_same_and_restores_the_modules(draft_model_dir):
    model = _load_model(draft_model_dir, "float32")
    norm = model.model.norm
    x = torch.randn(2, 3, model.config.hidden_size)
    want = norm(x)
    with export_mod.fusable_rms_norms(model) as patched:
        assert patched == 2 * model.config.num_hidden_layers + 1
        torch.testing.assert_close(norm(x), want, rtol=1e-6, atol=1e-6)
    assert "forward" not in vars(norm)
