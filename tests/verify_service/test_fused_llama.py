"""Our fused Llama forward (fused_llama.py) computes transformers' Llama forward: same logits over ragged tree batches
(float64: 1e-10; the tiny target has grouped-query attention, 4 query heads on 2 KV heads), the same KV entries, and
the transformers forward still works on the same, now shared, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from cast_models.tiny import tiny_llama_config
from verify_service.fused_llama import EAGER, FusedLlama, build_fused, stacked_mask
from verify_service.kv_cache import KVStore
from verify_service.static_forward import StaticForward, static_store
from verify_service.target import TargetModel

from verify_helpers import tree_with_path


def fresh_store(target: TargetModel, new_entries: int) -> KVStore:
    """A store with one empty sequence, set up for a forward of new_entries tokens."""
    store = static_store(target, 1, new_entries)
    store.begin_prefill([store.allocate()], new_entries)
    return store


@pytest.fixture(scope="module")
def pair64(target64, oracle64) -> tuple[TargetModel, TargetModel]:
    """(transformers' forward, the fused forward), float64, separate copies of the same checkpoint."""
    assert oracle64.fused is None and isinstance(target64.fused, FusedLlama)
    return oracle64, target64


def test_fused_tree_logits_and_kv_equal_transformers(pair64):
    plain, fused = pair64
    rng = np.random.default_rng(5)
    prefixes = [rng.integers(0, plain.vocab_size, n).tolist() for n in (7, 1, 30, 12)]
    trees = [tree_with_path(rng, int(rng.integers(plain.vocab_size)), [], 0, plain.vocab_size, extra_nodes=e)[0]
             for e in (0, 9, 4, 20)]
    results = []
    for target in (plain, fused):
        forward = StaticForward(target, static_store(target, 4, max_tree_tokens=32), max_tree_tokens=32)
        kvs = [forward.store.allocate() for _ in prefixes]
        target.prefill(kvs, prefixes)
        results.append((forward.tree_logits(kvs, trees), forward.store))
    (want, plain_store), (got, fused_store) = results
    for g, w, tree in zip(got, want, trees, strict=True):
        assert g.shape == (len(tree), plain.vocab_size)
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    for a, b in zip(plain_store.layers, fused_store.layers, strict=True):  # prefill and tree entries alike
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b.values, a.values, rtol=1e-10, atol=1e-10)


def test_last_only_gives_the_last_position(pair64):
    _, fused = pair64
    ids = torch.tensor([[5, 9, 2, 7]])
    positions = torch.arange(4)[None]
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64).masked_fill_(
        ~torch.ones(4, 4, dtype=torch.bool).tril(), torch.finfo(torch.float64).min)
    full, last = [fused.forward(fresh_store(fused, 4), ids, positions, mask, last_only=flag) for flag in (False, True)]
    assert last.shape == (1, 1, fused.vocab_size)
    torch.testing.assert_close(last[0, 0], full[0, -1], rtol=1e-10, atol=1e-10)


def test_fused_weights_are_views_and_the_transformers_forward_still_agrees(tiny_pair):
    target = TargetModel.load(tiny_pair[0], dtype="float64", device="cpu")
    attn = target.model.model.layers[0].self_attn
    qkv = target.fused.layers[0].qkv
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()  # no second copy of the weights
    assert attn.v_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        want = target.model(input_ids=ids).logits
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.float64).masked_fill_(
        ~torch.ones(5, 5, dtype=torch.bool).tril(), torch.finfo(torch.float64).min)
    got = target.fused.forward(fresh_store(target, 5), ids, torch.arange(5)[None], mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_stacked_mask_repeats_rows_per_query_group_and_aligns_them():
    mask = torch.randn(2, 1, 3, 5)
    stacked = stacked_mask(mask, groups=4)
    assert stacked.shape == (2, 1, 12, 5) and stacked.stride(2) % 16 == 0
    for g in range(4):
        torch.testing.assert_close(stacked[:, :, 3 * g : 3 * g + 3], mask)


def test_models_it_does_not_cover_keep_the_transformers_forward():
    config = tiny_llama_config(64, hidden=32, layers=1, heads=2, kv_heads=1, eos_id=0)
    config.attention_bias = True
    model = LlamaForCausalLM(config)
    assert build_fused(model, torch.device("cpu")) is None


def test_auto_is_fused_and_eager_on_the_cpu(tiny_pair):
    target = TargetModel.load(tiny_pair[0], dtype="float32", device="cpu")
    assert target.fused is not None and target.fused.kernels is EAGER


def test_the_probe_compiles_what_serving_calls(tiny_pair):
    """torch.compile specialises on argument kinds: a float's value, Parameter vs plain tensor, sizes of 1, aliased
    arguments. Every call the forward makes must match a call of the load-time probe in those respects, or
    compilation happens mid-serving (on an H100 an epsilon of 2.5e-6 against the probe's 1e-5 recompiled every
    variant and hit the recompile limit)."""
    from dataclasses import fields

    from verify_service import fused_llama

    def kind(args) -> tuple:
        out = []
        for a in args:
            if isinstance(a, torch.Tensor):
                out.append((type(a).__name__, a.dim(), tuple(d == 1 for d in a.shape[:2]) if a.dim() >= 2 else ()))
            else:
                out.append(a)  # ints and floats are constants of the compiled code
        aliased = len({a.data_ptr() for a in args if isinstance(a, torch.Tensor)}) < sum(
            isinstance(a, torch.Tensor) for a in args)
        return (*out, aliased)

    seen: dict[str, set] = {"probe": set(), "serving": set()}
    phase = ["probe"]

    def recording(name, fn):
        def call(*args):
            seen[phase[0]].add((name, kind(args)))
            return fn(*args)
        return call

    kernels = fused_llama.Kernels(*(recording(f.name, getattr(EAGER, f.name)) for f in fields(EAGER)))
    target = TargetModel.load(tiny_pair[0], dtype="float32", device="cpu")
    target.model.config.rms_norm_eps = target.fused.eps = 2.5e-6  # not the probe's old constant
    fused_llama.probe_kernels(kernels, target.model, target.device)
    phase[0] = "serving"
    target.fused.kernels = kernels
    forward = StaticForward(target, static_store(target, 8, max_tree_tokens=16), max_tree_tokens=16)
    kvs = [forward.store.allocate() for _ in range(3)]
    target.prefill(kvs, [[1, 2, 3], [4], [5, 6, 7, 8, 9]])
    target.prefill(kvs[:1], [[10]])
    rng = np.random.default_rng(0)
    trees = [tree_with_path(rng, 3, [], 0, target.vocab_size, extra_nodes=e)[0] for e in (0, 5, 2)]
    forward.tree_logits(kvs, trees)
    forward.tree_logits(kvs[:1], trees[1:2])
    forward.tree_logits(kvs[:1], trees[:1])
    assert seen["serving"] and seen["serving"] <= seen["probe"], seen["serving"] - seen["probe"]
