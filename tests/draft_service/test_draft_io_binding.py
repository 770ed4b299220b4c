"""The I/O-binding runner path (the CUDA default) against session.run on the same provider: the same numbers, the KV
passed between the forwards of one Expand as OrtValues, and the bytes that cross to and from a GPU (would cross, on
the CPU provider). Runs on CPU everywhere and on CUDA too where this onnxruntime has it."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from cast_runtime.sessions import SessionStore
from draft_service import step_profile
from draft_service.expansion import Budget, Expander, SequenceInput
from draft_service.export import export_draft, sample_inputs
from draft_service.runner import DraftRunner, Traffic, choose_dtype

PROMPT = [5, 17, 99, 3, 200, 42, 7, 310, 64]


PROVIDERS = ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])


@pytest.fixture(scope="module", params=PROVIDERS)
def pair(request, exported) -> tuple[DraftRunner, DraftRunner]:
    """(plain, I/O binding) runners on one provider, the fp32 export."""
    return (DraftRunner(*exported, provider=request.param, io_binding=False),
            DraftRunner(*exported, provider=request.param, io_binding=True))


def expander(runner: DraftRunner) -> Expander:
    return Expander(runner, SessionStore(8, 60.0), runner.meta.max_context)


def seq(sid: str, tokens, start: int = 0) -> SequenceInput:
    return SequenceInput(sid, np.asarray(tokens, dtype=np.int64), start)


def close(have, want) -> None:
    """Equal on CPU (same kernels either way); within 1e-6 leaves room for CUDA's kernel choices."""
    np.testing.assert_allclose(have, want, rtol=0, atol=1e-6)


def feeds_for(meta, batch=3, past_len=5, new=4, seed=7):
    dims = {n: getattr(meta, n) for n in ("num_layers", "num_kv_heads", "head_dim", "vocab_size")}
    f = sample_inputs(dims, meta.dtype, batch=batch, past_len=past_len, new=new, seed=seed)
    layers = range(meta.num_layers)
    return f, [f[f"past.{l}.key"] for l in layers], [f[f"past.{l}.value"] for l in layers]


def test_defaults_follow_the_provider(runner):
    assert runner.io_binding is False and runner.backend == "onnxruntime:CPUExecutionProvider"
    assert choose_dtype("auto", "CUDAExecutionProvider") == "float16"
    assert choose_dtype("auto", "CPUExecutionProvider") == "float32"
    assert choose_dtype("float32", "CUDAExecutionProvider") == "float32"


def test_bound_run_equals_plain_run_and_chains_ortvalues(pair):
    runner, bound_runner = pair
    f, keys, values = feeds_for(runner.meta)
    plain = runner.run(f["input_ids"], f["position_ids"], f["attention_mask"], keys, values)
    bound = bound_runner.run(f["input_ids"], f["position_ids"], f["attention_mask"], keys, values)
    np.testing.assert_array_equal(bound.ids, plain.ids)
    close(bound.probs, plain.probs)
    assert all(isinstance(v, ort.OrtValue) and v.device_name() == bound_runner.device
               for v in bound.keys + bound.values)
    for have, want in zip(bound.keys + bound.values, plain.keys + plain.values):
        close(have.numpy(), want)
    # The next forward takes the present as its past: OrtValues as they are, numpy for the plain path.
    B, T = f["input_ids"].shape
    S = T + keys[0].shape[2]
    mask = np.zeros((B, 1, 2, S + 2), dtype=runner.dtype)
    ids, pos = f["input_ids"][:, :2], f["position_ids"][:, :2] + 3
    plain2 = runner.run(ids, pos, mask, plain.keys, plain.values)
    bound2 = bound_runner.run(ids, pos, mask, bound.keys, bound.values)
    np.testing.assert_array_equal(bound2.ids, plain2.ids)
    close(bound2.probs, plain2.probs)
    cols = bound_runner.columns_to_host(bound2.keys + bound2.values, S, S + 2)
    for have, want in zip(cols, plain2.keys + plain2.values):
        assert have.shape == (B, runner.meta.num_kv_heads, 2, runner.meta.head_dim)
        close(have, want[:, :, S : S + 2])


def test_io_binding_grows_the_same_trees_as_batches_change(pair):
    """Several Expand calls on two expanders, one per path, with sequences joining, leaving and coming back."""
    runner, bound_runner = pair
    plain, bound = expander(runner), expander(bound_runner)
    eagle = Budget(top_k=4, max_depth=4, max_breadth=3)
    calls = [
        ([seq("a", PROMPT), seq("b", [1, 2])], eagle),
        ([seq("b", [7], 2), seq("c", [300, 301, 302, 303, 304])], eagle),
        ([seq("a", [11, 12, 13], 9), seq("c", [8], 5), seq("d", [4, 4, 4, 4])], Budget(3, 5, 2)),
        ([seq("d", [9, 10], 4)], Budget(8, 2, 8)),
        ([seq("c", [1, 2, 3, 4], 6), seq("a", [5], 12), seq("b", [6, 6], 3)], eagle),
    ]
    for sequences, budget in calls:
        want, _ = plain.expand(sequences, budget)
        got, _ = bound.expand(sequences, budget)
        for w, g in zip(want, got):
            assert g.sequence_id == w.sequence_id and g.layers == w.layers
            np.testing.assert_array_equal(g.tree.tokens, w.tree.tokens)
            np.testing.assert_array_equal(g.tree.parents, w.tree.parents)
            np.testing.assert_allclose(g.tree.values, w.tree.values, rtol=0, atol=1e-6)
    for sid in "abcd":
        s, t = plain.sessions.get(sid), bound.sessions.get(sid)
        assert s.length == t.length
        for a, b in zip(s.keys + s.values, t.keys + t.values):
            close(a[:, : s.length], b[:, : t.length])


def test_io_binding_moves_only_the_commit_kv(pair):
    """Per Expand: plain copies every forward's past in and present out; I/O binding the committed past in and the
    new columns out, whatever the depth."""
    runner, bound_runner = pair
    meta = runner.meta
    column = 2 * meta.num_layers * meta.num_kv_heads * meta.head_dim * runner.dtype.itemsize  # K+V, all layers
    budget = Budget(top_k=4, max_depth=4, max_breadth=3)
    traffic = {}
    for r in (runner, bound_runner):
        ex = expander(r)
        ex.expand([seq("a", PROMPT), seq("b", [1, 2])], budget)
        before = Traffic(**r.traffic.as_dict())
        ex.expand([seq("a", [11, 12, 13], 9), seq("b", [7], 2)], budget)
        traffic[r.io_binding] = r.traffic.since(before)
    B, P, T = 2, 9, 3  # batch, longest committed, longest new: the commit's past and new columns are padded
    assert traffic[True].kv_to_device == B * P * column
    assert traffic[True].kv_to_host == B * T * column
    # plain: the commit's past (P) and present (P+T), then 3 tree forwards (4 layers of candidates) of 3 nodes
    # each: past in, present out.
    layers = [P + T + 3 * i for i in range(3)]
    assert traffic[False].kv_to_device == B * column * (P + sum(layers))
    assert traffic[False].kv_to_host == B * column * (P + T + sum(s + 3 for s in layers))
    assert traffic[True].io_to_host == traffic[False].io_to_host  # the top-K cross either way


def test_step_profile_writes_a_row_per_batch_and_mode(exported, draft_model_dir, tmp_path, capsys):
    out = tmp_path / "step.json"
    code = step_profile.main(["--model", str(draft_model_dir), "--provider", "cpu", "--batch", "1,2",
                              "--depth", "3", "--top-k", "8", "--breadth", "2", "--context", "16",
                              "--io-binding", "on,off", "--layouts", "dynamic,static", "--repeats", "3",
                              "--warmup", "1", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert (result["provider"], result["dtype"], result["device"]) == ("CPUExecutionProvider", "float32", "cpu")
    rows = result["rows"]
    assert [(r["layout"], r["batch"], r["io_binding"]) for r in rows] == [
        ("dynamic", 1, True), ("dynamic", 1, False), ("dynamic", 2, True), ("dynamic", 2, False),
        ("static", 1, True), ("static", 2, True)]
    assert all(r["median_ms"] > 0 and r["layers"] == 3 and r["nodes_per_tree"] == 1 + 8 + 16 + 16 for r in rows)
    dynamic = rows[:4]
    for on, off in zip(dynamic[::2], dynamic[1::2]):
        assert on["kv_bytes_per_expand"] < off["kv_bytes_per_expand"]
    assert "median ms" in capsys.readouterr().out


def test_step_profile_times_cast_rules_on_the_same_tree(exported, draft_model_dir, tmp_path):
    out = tmp_path / "rules.json"
    assert step_profile.main(["--model", str(draft_model_dir), "--provider", "cpu", "--batch", "2", "--depth", "3",
                              "--top-k", "8", "--breadth", "2", "--context", "16", "--layouts", "static",
                              "--rules", "eagle2,cast", "--repeats", "2", "--warmup", "1", "--out", str(out)]) == 0
    eagle2, cast = json.loads(out.read_text())["rows"]
    assert (eagle2["rules"], cast["rules"]) == ("eagle2", "cast")
    assert (cast["nodes_per_tree"], cast["layers"]) == (eagle2["nodes_per_tree"], eagle2["layers"]) == (41, 3)


def test_float16_export_runs_both_paths_alike(draft_model_dir):
    """fp16 (the CUDA default): the mask and the KV follow the export's dtype; top-K probs stay fp32."""
    onnx_path, meta = export_draft(draft_model_dir, top_k=8, dtype="float16")
    plain = DraftRunner(onnx_path, meta, provider="cpu", io_binding=False)
    bound = DraftRunner(onnx_path, meta, provider="cpu", io_binding=True)
    assert plain.dtype == np.float16 and plain.mask_min == float(np.finfo(np.float16).min)
    budget = Budget(top_k=4, max_depth=3, max_breadth=2)
    a, b = expander(plain), expander(bound)
    for sequences in ([seq("a", PROMPT), seq("b", [1, 2])], [seq("b", [3], 2), seq("a", [4, 5], 9)]):
        want, _ = a.expand(sequences, budget)
        got, _ = b.expand(sequences, budget)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(g.tree.tokens, w.tree.tokens)
            np.testing.assert_array_equal(g.tree.parents, w.tree.parents)
            close(g.tree.values, w.tree.values)
    assert b.sessions.get("a").keys[0].dtype == np.float16
