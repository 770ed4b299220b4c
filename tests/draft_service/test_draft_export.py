"""The exported graph matches the model's own forward on a tree with past KV, and the export cache hits on the second
call."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest
import torch

from draft_service import export as export_mod
from draft_service.export import SampleTree, _cache_arg, _load_model, export_draft, sample_tree


def reference_forward(model, sample: SampleTree, top_k: int):
    """transformers' own forward over a growing cache with an additive tree mask: (top-K probs [B, T, K], ids
    [B, T, K], per layer key0, value0, ... [B, Hkv, P+T, D]), as torch tensors."""
    from transformers import DynamicCache

    t = torch.from_numpy
    cache = DynamicCache(ddp_cache_data=[(t(sample.past[i]), t(sample.past[i + 1]))
                                         for i in range(0, len(sample.past), 2)])
    with torch.no_grad():
        out = model(input_ids=t(sample.input_ids), position_ids=t(sample.position_ids),
                    attention_mask=t(sample.attention_mask), use_cache=True, **{_cache_arg(model): cache})
    topk = torch.topk(torch.softmax(out.logits.float(), dim=-1), top_k, dim=-1)
    return topk.values, topk.indices, [kv for layer in cache.layers for kv in (layer.keys, layer.values)]


def test_ort_topk_matches_the_models_own_forward_on_a_tree_with_past(exported, draft_model_dir):
    """The graph over KV buffers (rows in, the tree mask built inside) against transformers' forward over a growing
    cache with the same tree as an additive mask: top-K ids equal, probabilities and written KV columns close."""
    path, meta = exported
    dims = {n: getattr(meta, n) for n in ("num_layers", "num_kv_heads", "head_dim", "vocab_size")}
    # Sizes unlike the export's sample (B=2, T=4, S=12): the dims are really dynamic.
    sample = sample_tree(dims, "float32", batch=3, capacity=20, past_len=5, new=7, ancestors=4, seed=42)
    want_probs, want_ids, want_kv = reference_forward(_load_model(draft_model_dir, "float32"), sample, meta.top_k)
    topk, *kv = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, sample.feeds)
    assert topk.shape == (3, 7, 2, meta.top_k)
    np.testing.assert_array_equal(topk[:, :, 1].astype(np.int64), want_ids.numpy())
    np.testing.assert_allclose(topk[:, :, 0], want_probs.numpy(), atol=1e-4)
    assert (np.diff(topk[:, :, 0], axis=-1) <= 0).all(), "top-K comes sorted, best first"
    buffers = [sample.feeds[name] for name in export_mod.io_names(meta.num_layers)[0][1:]]
    for have, want, before in zip(kv, want_kv, buffers):
        assert have.shape == (3, meta.num_kv_heads, 20, meta.head_dim)
        np.testing.assert_allclose(have[:, :, : 5 + 7], want.numpy(), atol=1e-4)
        np.testing.assert_array_equal(have[:, :, 5 + 7 :], before[:, :, 5 + 7 :])  # columns not written: as they were


def test_float16_export_keeps_the_kv_in_float16_and_grows_the_same_trees_in_both_buffer_modes(draft_model_dir):
    """fp16 (the CUDA default): the buffers follow the export's dtype, top-K probs stay fp32 (softmax in fp32), and
    fixed buffers (the CUDA path) and growing ones grow the same trees over two calls."""
    from cast_runtime.sessions import SessionStore
    from draft_service.expansion import Budget, Expander, SequenceInput
    from draft_service.runner import DraftRunner

    onnx_path, meta = export_draft(draft_model_dir, top_k=8, dtype="float16")  # checked against torch on export
    assert meta.dtype == "float16"
    budget = Budget(top_k=4, max_depth=3, max_breadth=2)
    calls = ([SequenceInput("a", np.array([5, 17, 99, 3, 200, 42]), 0), SequenceInput("b", np.array([1, 2]), 0)],
             [SequenceInput("b", np.array([3]), 2), SequenceInput("a", np.array([4, 5]), 6)])
    trees = {}
    for fixed in (True, False):
        runner = DraftRunner(onnx_path, meta, provider="cpu", fixed_buffers=fixed)
        ex = Expander(runner, SessionStore(8, 60.0), meta.max_context)
        trees[fixed] = [e for sequences in calls for e in ex.expand(sequences, budget)[0]]
        assert all(v.numpy().dtype == np.float16 for v in runner.buffers[2].sets[0])
    for want, got in zip(trees[True], trees[False]):
        got.tree.validate()
        assert len(got.tree) == 1 + 4 + 8 + 8 and got.tree.values.dtype == np.float32
        np.testing.assert_array_equal(got.tree.tokens, want.tree.tokens)
        np.testing.assert_array_equal(got.tree.parents, want.tree.parents)
        np.testing.assert_allclose(got.tree.values, want.tree.values, rtol=0, atol=1e-3)


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
