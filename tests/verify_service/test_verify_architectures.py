"""Targets the fused forward does not cover (Qwen2, Mistral, GPT-2) run transformers' own forward over the same KV
store and bucketed tree forward, and commit exactly their own greedy output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (AutoTokenizer, GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from verify_service.target import TargetModel
from verify_service.verifier import PrefillItem, Verifier, VerifyItem

from verify_helpers import greedy_reference, tree_with_path


def tiny_model(architecture: str, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, initializer_range=0.2)  # peaked random logits: a stable argmax
    if architecture == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, **common))
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, **common)
    if architecture == "qwen2":  # attention biases: not the fused forward's
        return Qwen2ForCausalLM(Qwen2Config(**llama_like))
    return MistralForCausalLM(MistralConfig(sliding_window=128, **llama_like))


@pytest.fixture(scope="module", params=["qwen2", "mistral", "gpt2"])
def target(request, tiny_pair, tmp_path_factory) -> TargetModel:
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    path = tmp_path_factory.mktemp(request.param)
    tiny_model(request.param, len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return TargetModel.load(path, dtype="float64", device="cpu")


def test_a_target_the_fused_forward_does_not_cover_stays_lossless(target: TargetModel):
    assert target.fused is None
    if target.model.config.model_type == "mistral":
        assert target.max_context == 128  # inside the sliding window: our mask gives every layer the whole prefix
    rng = np.random.default_rng(9)
    verifier = Verifier(target, max_batch=4, session_ttl_s=60, max_tree_tokens=32)
    prompts = [[5], rng.integers(1, target.vocab_size, 70).tolist(), rng.integers(1, target.vocab_size, 9).tolist()]
    refs = [greedy_reference(target, p, 16) for p in prompts]
    verifier.prefill([PrefillItem(f"s{i}", p) for i, p in enumerate(prompts)])
    committed = [[] for _ in prompts]
    while any(len(c) < len(r) for c, r in zip(committed, refs)):
        items, expected = [], []
        for i, (done, ref) in enumerate(zip(committed, refs)):
            if len(done) >= len(ref):
                continue
            k = len(done)
            depth = int(rng.integers(0, min(4, len(ref) - k)))
            pending = prompts[i][-1] if k == 0 else done[-1]
            tree, path = tree_with_path(rng, pending, ref[k : k + depth], ref[k + depth], target.vocab_size,
                                        int(rng.integers(0, 8)))
            items.append(VerifyItem(f"s{i}", tree))
            expected.append((i, path))
        results, _ = verifier.verify(items)
        for (i, path), result in zip(expected, results, strict=True):
            assert result.accepted_nodes == path
            committed[i] += result.committed_tokens
    for done, ref in zip(committed, refs, strict=True):
        assert done[: len(ref)] == ref
