"""One forward for a whole Verify (and Prefill): ragged contexts and trees give every sequence its own logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cast_core.tree import TokenTree
from verify_service.static_forward import StaticForward, static_store
from verify_service.target import TargetModel
from verify_service.verifier import PrefillItem, Verifier, VerifyItem

from verify_helpers import greedy_reference, tree_with_path

CONTEXTS = (0, 1, 5, 13, 30, 2)


def random_trees(rng: np.random.Generator, vocab_size: int, count: int) -> list[TokenTree]:
    trees = []
    for _ in range(count):
        depth = int(rng.integers(0, 4))
        tree, _ = tree_with_path(rng, int(rng.integers(vocab_size)), rng.integers(0, vocab_size, depth).tolist(),
                                 0, vocab_size, extra_nodes=int(rng.integers(0, 12)))
        trees.append(tree)
    return trees


def tree_forward(target: TargetModel, slots: int) -> StaticForward:
    """The verifier's tree forward over a store of its own."""
    return StaticForward(target, static_store(target, slots, max_tree_tokens=32), max_tree_tokens=32)


def alone(target: TargetModel, prefix: list[int], tree: TokenTree) -> torch.Tensor:
    """[N, V] the tree's logits from a one-sequence forward in a store of its own."""
    forward = tree_forward(target, slots=1)
    kv = forward.store.allocate()
    target.prefill([kv], [prefix])
    (logits,) = forward.tree_logits([kv], [tree])
    return logits


@pytest.mark.parametrize("layout", ["consecutive", "shuffled", "gathered"])
def test_batched_tree_logits_equal_one_sequence_forwards(target64: TargetModel, layout: str):
    rng = np.random.default_rng(3)
    forward = tree_forward(target64, slots=16)
    store = forward.store
    prefixes = [rng.integers(0, target64.vocab_size, c).tolist() for c in CONTEXTS]
    kvs = []
    for _ in prefixes:
        kvs.append(store.allocate())
        if layout == "gathered":
            store.allocate()  # a sequence between every two of the batch: its slots are not consecutive
    target64.prefill(kvs, prefixes)  # one padded prefill
    trees = random_trees(rng, target64.vocab_size, len(prefixes))
    order = rng.permutation(len(kvs)) if layout != "consecutive" else np.arange(len(kvs))
    logits = forward.tree_logits([kvs[i] for i in order], [trees[i] for i in order])
    assert [kv.length for kv in kvs] == [len(p) for p in prefixes]  # nothing kept yet
    for i, got in zip(order, logits):
        assert got.shape == (len(trees[i]), target64.vocab_size)
        torch.testing.assert_close(got, alone(target64, prefixes[i], trees[i]), rtol=1e-9, atol=1e-9)


def test_batched_prefill_fills_each_slot_like_a_prefill_of_its_own(target64: TargetModel):
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, target64.vocab_size, n).tolist() for n in (7, 1, 0, 20)]
    store = static_store(target64, 4, max_tree_tokens=8)
    kvs = [store.allocate() for _ in prompts]
    target64.prefill(kvs, prompts)
    assert [kv.length for kv in kvs] == [7, 1, 0, 20]
    for kv, prompt in zip(kvs, prompts):
        own = static_store(target64, 1, max_tree_tokens=8).allocate()
        target64.prefill([own], [prompt])
        for layer, ref in zip(store.layers, own.store.layers, strict=True):
            n = len(prompt)
            torch.testing.assert_close(layer.keys[kv.slot, :, :n], ref.keys[0, :, :n], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(layer.values[kv.slot, :, :n], ref.values[0, :, :n], rtol=1e-9, atol=1e-9)


def test_freeing_a_slot_moves_the_last_sequence_into_it(target64: TargetModel):
    rng = np.random.default_rng(5)
    forward = tree_forward(target64, slots=4)
    store = forward.store
    prefixes = [rng.integers(0, target64.vocab_size, n).tolist() for n in (4, 9, 6)]
    kvs = [store.allocate() for _ in prefixes]
    target64.prefill(kvs, prefixes)
    kvs[0].free()
    kvs[0].free()  # idempotent
    assert (kvs[0].slot, kvs[2].slot, kvs[1].slot) == (-1, 0, 1) and store.owners == [kvs[2], kvs[1]]
    tree = TokenTree.root_only(3)
    for kv, prefix in ((kvs[2], prefixes[2]), (kvs[1], prefixes[1])):
        (got,) = forward.tree_logits([kv], [tree])
        torch.testing.assert_close(got, alone(target64, prefix, tree), rtol=1e-9, atol=1e-9)


def test_ragged_sequences_joining_and_leaving_commit_the_targets_greedy_output(target64: TargetModel):
    """Sequences of different lengths verified together for many steps; some join late (batched prefills), each
    leaves when done (release moves slots around); a few steps verify only a subset (gathered slots)."""
    rng = np.random.default_rng(6)
    verifier = Verifier(target64, max_batch=16, session_ttl_s=60)
    lengths = (1, 3, 11, 2, 25, 6, 1, 17)
    prompts = [rng.integers(1, target64.vocab_size, n).tolist() for n in lengths]
    new_tokens = [int(rng.integers(5, 30)) for _ in prompts]
    refs = [greedy_reference(target64, p, n) for p, n in zip(prompts, new_tokens)]
    joins = {0: [0, 1, 2], 2: [3, 4], 5: [5, 6, 7]}  # step -> sequences that join before it
    committed: dict[int, list[int]] = {}
    pending: dict[int, int] = {}
    step = 0
    while step <= max(joins) or committed and any(len(committed[s]) < len(refs[s]) for s in committed):
        if step in joins:
            verifier.prefill([PrefillItem(f"s{s}", prompts[s]) for s in joins[step]])
            for s in joins[step]:
                committed[s], pending[s] = [], prompts[s][-1]
        live = [s for s in committed if len(committed[s]) < len(refs[s])]
        if step % 4 == 3 and len(live) > 2:
            live = live[::2]  # a subset: not every live slot is in the batch
        items, expected = [], []
        for s in live:
            k, ref = len(committed[s]), refs[s]
            if rng.random() < 0.3:
                tree, path_nodes = TokenTree.root_only(pending[s]), []
            else:
                depth = int(rng.integers(0, min(5, len(ref) - k)))
                tree, path_nodes = tree_with_path(rng, pending[s], ref[k : k + depth], ref[k + depth],
                                                  target64.vocab_size, int(rng.integers(0, 10)))
            items.append(VerifyItem(f"s{s}", tree))
            expected.append(path_nodes)
        if items:
            order = rng.permutation(len(items))  # the request's order need not be the slots'
            results, _ = verifier.verify([items[i] for i in order])
            for i, result in zip(order, results):
                s = int(items[i].sequence_id[1:])
                assert result.accepted_nodes == expected[i]
                committed[s] += result.committed_tokens
                pending[s] = result.bonus_token
                if len(committed[s]) >= len(refs[s]):
                    verifier.release([f"s{s}"])
        step += 1
    for s, ref in enumerate(refs):
        assert committed[s][: len(ref)] == ref, s
    assert len(verifier.sessions) == 0 and verifier.kv.owners == []


def test_expiry_frees_the_slots(target64: TargetModel):
    now = [0.0]
    verifier = Verifier(target64, max_batch=2, session_ttl_s=10, clock=lambda: now[0])
    verifier.prefill([PrefillItem("a", [1, 2]), PrefillItem("b", [3])])
    now[0] = 20.0
    verifier.prefill([PrefillItem("c", [4, 5, 6])])  # create() expires a and b to make room
    assert list(verifier.kv.owners) == [verifier.sessions.get("c").kv]
    (result,), _ = verifier.verify([VerifyItem("c", TokenTree.root_only(6))])
    assert result.committed_tokens == greedy_reference(target64, [4, 5, 6], 1)


def test_a_prefill_padded_to_an_alignment_fills_the_same_kv(target64: TargetModel):
    """On CUDA prefills are padded (TargetModel.prefill_align) so that prompt lengths share shapes; the padding
    writes only scratch entries. An alignment past the store's room is cut to it."""
    from dataclasses import replace

    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, target64.vocab_size, n).tolist() for n in (5, 11, 3)]
    stores = []
    for align in (1, 8, 10**6):
        store = static_store(target64, 4, 16)
        kvs = [store.allocate() for _ in prompts]
        replace(target64, prefill_align=align).prefill(kvs, prompts)
        assert [kv.length for kv in kvs] == [5, 11, 3]
        stores.append((store, kvs))
    (plain, plain_kvs) = stores[0]
    for aligned, aligned_kvs in stores[1:]:
        for a, b in zip(plain.layers, aligned.layers, strict=True):
            for kv_a, kv_b, prompt in zip(plain_kvs, aligned_kvs, prompts):
                n = len(prompt)
                torch.testing.assert_close(a.keys[kv_a.slot, :, :n], b.keys[kv_b.slot, :, :n], rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(a.values[kv_a.slot, :, :n], b.values[kv_b.slot, :, :n], rtol=1e-9,
                                           atol=1e-9)
