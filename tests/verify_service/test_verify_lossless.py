"""Losslessness: prefill + tree verification commits exactly what the target's own greedy decoding produces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cast_core.tree import TokenTree
from verify_service.static_forward import StaticForward, static_store
from verify_service.target import TargetModel
from verify_service.verifier import PrefillItem, Verifier, VerifyItem

from verify_helpers import greedy_reference, tree_with_path

NEW_TOKENS = 40


def prompts(vocab_size: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    # A 1-token prompt (empty KV), short ones and a longer one.
    return [[7]] + [rng.integers(1, vocab_size, n).tolist() for n in (2, 5, 13, 31)]


@pytest.mark.parametrize("mode", ["trees", "root_only"])
def test_batched_steps_commit_the_targets_greedy_output(target64: TargetModel, mode: str):
    rng = np.random.default_rng(0)
    verifier = Verifier(target64, max_batch=16, session_ttl_s=60)
    cases = prompts(target64.vocab_size)
    refs = [greedy_reference(target64, p, NEW_TOKENS) for p in cases]
    ids = [f"seq-{i}" for i in range(len(cases))]
    verifier.prefill([PrefillItem(s, p) for s, p in zip(ids, cases)])
    committed: dict[str, list[int]] = {s: [] for s in ids}
    pending = {s: p[-1] for s, p in zip(ids, cases)}
    steps = 0
    while True:
        items, expected = [], {}
        for s, ref in zip(ids, refs):
            k = len(committed[s])
            if k >= len(ref):
                continue
            if mode == "root_only":
                tree, path_nodes = TokenTree.root_only(pending[s]), []
            else:
                depth = int(rng.integers(0, min(5, len(ref) - k)))  # the bonus ref[k + depth] must exist
                tree, path_nodes = tree_with_path(
                    rng, pending[s], ref[k : k + depth], ref[k + depth], target64.vocab_size, int(rng.integers(0, 8))
                )
            items.append(VerifyItem(s, tree))
            expected[s] = path_nodes
        if not items:
            break
        results, seconds = verifier.verify(items)
        assert seconds > 0
        steps += 1
        for item, result in zip(items, results):
            assert result.accepted_nodes == expected[item.sequence_id]
            committed[item.sequence_id] += result.committed_tokens
            pending[item.sequence_id] = result.bonus_token
    for s, ref in zip(ids, refs):
        assert committed[s] == ref, s
    if mode == "trees":
        assert steps < max(map(len, refs))  # speculation did commit several tokens per step


def test_kv_after_compaction_equals_a_fresh_prefill(target64: TargetModel):
    prompt = [3, 141, 59, 26, 53, 58, 97]
    ref = greedy_reference(target64, prompt, 8)
    rng = np.random.default_rng(5)
    verifier = Verifier(target64, max_batch=4, session_ttl_s=60)
    verifier.prefill([PrefillItem("s", prompt)])
    tree, path_nodes = tree_with_path(rng, prompt[-1], ref[:3], ref[3], target64.vocab_size, extra_nodes=6)
    (result,), _ = verifier.verify([VerifyItem("s", tree)])
    assert result.accepted_nodes == path_nodes and result.committed_tokens == ref[:4]
    session = verifier.sessions.get("s")
    sequence = prompt + result.committed_tokens  # all committed; the last one is pending
    assert session.kv.length == len(sequence) - 1 and session.pending == sequence[-1]

    # The cache holds what a fresh prefill of the committed sequence would hold...
    fresh = static_store(target64, 1, max_tree_tokens=8).allocate()
    target64.prefill([fresh], [sequence[:-1]])
    n = fresh.length
    for kept, new in zip(verifier.kv.layers, fresh.store.layers, strict=True):
        s, f = session.kv.slot, fresh.slot
        torch.testing.assert_close(kept.keys[s, :, :n], new.keys[f, :, :n], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(kept.values[s, :, :n], new.values[f, :, :n], rtol=1e-9, atol=1e-9)
    # ...and the next forward on it gives the logits of a full forward over the committed sequence.
    (next_logits,) = verifier.static.tree_logits([session.kv], [TokenTree.root_only(sequence[-1])])
    with torch.no_grad():
        full = target64.model(torch.tensor([sequence])).logits[0, -1]
    torch.testing.assert_close(next_logits[0], full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "forward, dtype, tol",
    [("fused", "float32", 1e-4), ("sdpa", "float64", 1e-9), ("eager", "float64", 1e-5), ("sdpa", "float32", 1e-4),
     ("eager", "float32", 1e-4)],
)
def test_tree_logits_equal_full_forwards_of_each_path(tiny_pair, forward: str, dtype: str, tol: float):
    """The custom 4D mask + explicit positions give every node the logits of its own root-to-node sequence, through
    our fused forward and through transformers' with either attention kernel it may choose for a model (the eager
    one adds the mask to the scores)."""
    fused = forward == "fused"
    target = TargetModel.load(tiny_pair[0], dtype=dtype, device="cpu", fused=fused,
                              attn_implementation=None if fused else forward)
    assert (target.fused is not None) == fused
    rng = np.random.default_rng(2)
    prefix = rng.integers(0, target.vocab_size, 9).tolist()
    tree_forward = StaticForward(target, static_store(target, 1, max_tree_tokens=32), max_tree_tokens=32)
    kv = tree_forward.store.allocate()
    target.prefill([kv], [prefix])
    tree, _ = tree_with_path(rng, 11, [12, 13, 14], 15, target.vocab_size, extra_nodes=10)
    (logits,) = tree_forward.tree_logits([kv], [tree])
    assert kv.length == len(prefix)  # the new entries wait for keep()
    for i in range(len(tree)):
        path = [i]
        while tree.parents[path[-1]] >= 0:
            path.append(int(tree.parents[path[-1]]))
        sequence = prefix + [int(tree.tokens[j]) for j in reversed(path)]
        with torch.no_grad():
            full = target.model(torch.tensor([sequence])).logits[0, -1]
        torch.testing.assert_close(logits[i], full, rtol=tol, atol=tol)


def test_failed_step_leaves_the_cache_as_it_was(target64: TargetModel, monkeypatch):
    verifier = Verifier(target64, max_batch=4, session_ttl_s=60)
    verifier.prefill([PrefillItem("a", [1, 2, 3]), PrefillItem("b", [4, 5])])
    real_forward = target64.forward

    def flaky(*args, **kwargs):  # the forward runs (new entries written), then the step fails
        real_forward(*args, **kwargs)
        raise RuntimeError("device lost")

    before = [(layer.keys.clone(), layer.values.clone()) for layer in verifier.kv.layers]
    monkeypatch.setattr(target64, "forward", flaky)
    with pytest.raises(RuntimeError):
        verifier.verify([VerifyItem("a", TokenTree.root_only(3)), VerifyItem("b", TokenTree.root_only(5))])
    monkeypatch.undo()
    for sequence_id, length in (("a", 2), ("b", 1)):
        kv = verifier.sessions.get(sequence_id).kv
        assert kv.length == length
        for layer, (keys, values) in zip(verifier.kv.layers, before, strict=True):
            assert torch.equal(layer.keys[kv.slot, :, :length], keys[kv.slot, :, :length])
            assert torch.equal(layer.values[kv.slot, :, :length], values[kv.slot, :, :length])
    # and the next step still commits the target's greedy tokens
    (ra, rb), _ = verifier.verify([VerifyItem("a", TokenTree.root_only(3)), VerifyItem("b", TokenTree.root_only(5))])
    assert ra.committed_tokens == greedy_reference(target64, [1, 2, 3], 1)
    assert rb.committed_tokens == greedy_reference(target64, [4, 5], 1)
