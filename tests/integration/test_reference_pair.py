"""The project's reference pair end to end: lossless against the target's own greedy decode, and it speculates."""

from __future__ import annotations

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cast.v1 import generation_pb2, generation_pb2_grpc
from cast_models.humaneval import load_prompts
from orchestrator.stack import REFERENCE_PAIR

PROMPTS = 4
MAX_NEW_TOKENS = 40


@pytest.fixture(scope="module")
def reference_stub(stack_factory):
    with grpc.insecure_channel(stack_factory("reference").spec.address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="module")
def reference_target():
    path = REFERENCE_PAIR / "target"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("policy", ["cast", "chain"])
def test_reference_pair_is_lossless_and_speculates(reference_stub, reference_target, policy):
    model, tokenizer = reference_target
    accepted = []
    for prompt in load_prompts()[:PROMPTS]:
        prompt = prompt.rstrip("\n")  # the model card's caveat: a bare trailing newline is out of distribution
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        response = reference_stub.Generate(
            generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=MAX_NEW_TOKENS, policy=policy), timeout=300
        )
        assert list(response.token_ids) == expected[0, ids.shape[1]:].tolist()
        accepted.append(response.stats.mean_accepted_length)
    # A trained pair agrees often (86% top-1 on HumanEval): every policy should commit well over one token a step.
    assert sum(accepted) / len(accepted) > 2.0, accepted
