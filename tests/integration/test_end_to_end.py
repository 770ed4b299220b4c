"""Generate over three real services (separate processes, real gRPC on loopback), against the target's own greedy
decoding with transformers' `generate()`."""

from __future__ import annotations

from datetime import datetime

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cast.v1 import generation_pb2, generation_pb2_grpc
from tests.integration.stacks import prompts_for_tests

MAX_NEW_TOKENS = (1, 5, 17, 40)


@pytest.fixture(scope="module")
def target_model(tiny_pair):
    target_dir, _ = tiny_pair
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float64).eval()
    return model, AutoTokenizer.from_pretrained(target_dir)


def greedy_reference(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module", params=["tiny-draft", "target-as-draft"])
def stack(request, stack_factory):
    """(name, stack)."""
    return request.param, stack_factory(request.param)


@pytest.fixture(scope="module")
def stub(stack):
    _, running = stack
    with grpc.insecure_channel(running.spec.address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def test_eagle2_is_token_for_token_the_targets_greedy_decode(stack, stub, target_model):
    name, _ = stack
    model, tokenizer = target_model
    accepted = []
    for i, prompt in enumerate(prompts_for_tests(20)):
        n = MAX_NEW_TOKENS[i % len(MAX_NEW_TOKENS)]
        response = stub.Generate(generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=n, policy="eagle2"))
        expected = greedy_reference(model, tokenizer, prompt, n)
        assert list(response.token_ids) == expected, f"prompt {i} ({name}), max_new_tokens {n}"
        assert response.usage.completion_tokens == len(expected)
        assert response.stats.steps >= 1
        accepted.append(response.stats.mean_accepted_length)
    if name == "target-as-draft":
        mean = sum(accepted) / len(accepted)
        assert mean > 1.5, f"the target drafting for itself should be accepted, got {mean:.2f} tokens/step"


def test_every_policy_and_the_stream_agree(stack, stub, target_model):
    model, tokenizer = target_model
    prompt = "def fibonacci(n):"
    expected = greedy_reference(model, tokenizer, prompt, 24)
    for policy in ("eagle2", "chain", "ar", "chain:6", "tree:4x5/16"):
        response = stub.Generate(generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=24, policy=policy))
        assert list(response.token_ids) == expected, policy
        assert response.stats.policy == policy
    chunks = list(stub.GenerateStream(generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=24, policy="eagle2")))
    assert [t for c in chunks for t in c.token_ids] == expected
    assert chunks[-1].finish_reason in (generation_pb2.FINISH_REASON_LENGTH, generation_pb2.FINISH_REASON_EOS)
    assert "".join(c.text for c in chunks) == stub.Generate(
        generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=24, policy="eagle2")
    ).text


def test_step_stats_break_each_step_down(stack, stub):
    """Each step's record says where its time went, and the parts add up to no more than the step."""
    response = stub.Generate(generation_pb2.GenerateRequest(
        prompt="def fibonacci(n):", max_new_tokens=12, policy="eagle2", return_step_stats=True))
    assert len(response.stats.step_stats) == response.stats.steps >= 1
    for step in response.stats.step_stats:
        if step.pipeline == "hit":  # its tree was drafted during the last Verify: it waited for no draft work
            assert step.draft_model_seconds == 0 and step.draft_rpc_seconds < step.step_seconds
        else:
            assert 0 < step.draft_model_seconds <= step.draft_rpc_seconds
        assert 0 < step.verify_model_seconds <= step.verify_rpc_seconds
        assert step.draft_rpc_seconds + step.verify_rpc_seconds <= step.step_seconds
    ar = stub.Generate(generation_pb2.GenerateRequest(
        prompt="def fibonacci(n):", max_new_tokens=4, policy="ar", return_step_stats=True))
    assert all(s.draft_rpc_seconds == 0 and s.verify_model_seconds > 0 for s in ar.stats.step_stats)


def test_step_stats_count_the_tokens_emitted(stack, stub):
    """A step that commits past max_new_tokens or a stop string counts only what the request emitted: the steps'
    accepted tokens add up to completion_tokens (issue 17: 65 for 64 emitted)."""
    for i, prompt in enumerate(prompts_for_tests(12)):
        n = MAX_NEW_TOKENS[i % len(MAX_NEW_TOKENS)]
        full = stub.Generate(generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=n, policy="eagle2",
                                                            return_step_stats=True))
        stop = full.text[len(full.text) // 2:][:3]  # a stop string that ends the request mid-way, where there is one
        stopped = stub.Generate(generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=n, policy="eagle2",
                                                               stop=[stop] if stop.strip() else [],
                                                               return_step_stats=True))
        for response in (full, stopped):
            accepted = [s.accepted_tokens for s in response.stats.step_stats]
            assert sum(accepted) == response.usage.completion_tokens == len(response.token_ids), f"prompt {i}"
            assert min(accepted) >= 1
            assert response.stats.mean_accepted_length == pytest.approx(sum(accepted) / len(accepted))


def startup_window(log_text: str, service: str) -> tuple[datetime, datetime]:
    """When the service's start-up (load, export, warm-up, profile) began and ended, from its log."""
    stamps = {}
    for line in log_text.splitlines():
        for event in ("began", "done"):
            if f"{service}: start-up {event}" in line and event not in stamps:
                stamps[event] = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    assert set(stamps) == {"began", "done"}, log_text[-2000:]
    return stamps["began"], stamps["done"]


def test_the_draft_and_verify_services_start_up_one_at_a_time(stack):
    """Started together, as `cast up` starts them: the one that profiles while the other loads would cache a table
    priced for that load (cast_runtime/cache.py)."""
    _, running = stack
    logs = running.spec.log_dir
    draft = startup_window((logs / "draft.log").read_text(), "draft service")
    verify = startup_window((logs / "verify.log").read_text(), "verify service")
    first, second = sorted([draft, verify])
    assert first[1] <= second[0], (draft, verify)
