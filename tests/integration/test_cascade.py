"""The cascade policies over real services (draft levels small, sparse and lookup in one draft service), against the
target's own greedy decoding with transformers: each level alone, all of them priced per step (`cascade`) and all
of them every step (`cascade-fixed`); and a target with no draft model at all."""

from __future__ import annotations

import grpc
import pytest

from cast.v1 import draft_pb2, draft_pb2_grpc, generation_pb2, generation_pb2_grpc
from tests.integration.stacks import prompts_for_tests
from tests.integration.test_end_to_end import greedy_reference, target_model  # noqa: F401 (a fixture)

CASCADE_POLICIES = ("cascade", "cascade-fixed", "small", "sparse", "lookup")
# Prompts that repeat themselves: the target's continuation often copies them, where lookup proposes chains.
REPETITIVE = ["x = [1, 2, 3]\nx = [1, 2, 3]\nx = [1, 2,", "def f(a):\n    return a\n\ndef f(a):\n    return"]


def generate(stub, prompt: str, policy: str, n: int) -> generation_pb2.GenerateResponse:
    return stub.Generate(generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=n, policy=policy), timeout=120)


@pytest.fixture(scope="module", params=["tiny-draft", "target-as-draft"])
def stack(request, stack_factory):
    return request.param, stack_factory(request.param)


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack[1].spec.address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


@pytest.mark.parametrize("policy", CASCADE_POLICIES)
def test_each_level_and_the_cascade_are_the_targets_greedy_decode(stack, stub, target_model, policy):
    name, _ = stack
    model, tokenizer = target_model
    accepted = []
    for i, prompt in enumerate(prompts_for_tests(6) + REPETITIVE):
        n = (5, 17, 40)[i % 3]
        response = generate(stub, prompt, policy, n)
        assert list(response.token_ids) == greedy_reference(model, tokenizer, prompt, n), f"prompt {i} ({name})"
        assert response.stats.policy == policy
        accepted.append(response.stats.mean_accepted_length)
    if name == "target-as-draft" and policy == "cascade-fixed":  # no gate: every step drafts with every level
        assert sum(accepted) / len(accepted) > 1.5, accepted


def test_step_stats_name_the_kind_of_each_step(stack, stub):
    """What a user profiles a cascade with: each step's arm (a model level with lookup's chain, lookup alone or
    plain decoding) and mode (copying where lookup's match agrees with the text, else writing)."""
    kinds = set()
    for prompt in REPETITIVE + prompts_for_tests(2):
        response = stub.Generate(generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=24, policy="cascade",
                                                                return_step_stats=True), timeout=120)
        for step in response.stats.step_stats:
            kinds.add((step.mode, step.arm))
            if step.arm == "plain":
                assert step.verified_nodes == 1 and step.draft_rpc_seconds == 0
    assert {arm for _, arm in kinds} <= {"small", "sparse", "lookup", "plain"} and len(kinds) >= 2, kinds
    assert {"copying", "writing"} == {mode for mode, _ in kinds}, kinds  # the repeats copy, the others write
    for policy, arms in (("cast", {"drafted", "plain"}), ("cascade-fixed", {"drafted"}), ("ar", {"plain"})):
        response = stub.Generate(generation_pb2.GenerateRequest(prompt=REPETITIVE[0], max_new_tokens=8, policy=policy,
                                                                return_step_stats=True), timeout=120)
        steps = response.stats.step_stats
        assert {s.arm for s in steps} <= arms and {s.mode for s in steps} <= {"", "copying", "writing"}, policy
        assert policy == "cascade-fixed" or {s.mode for s in steps} == {""}, policy


def test_a_step_drafts_with_every_level_in_one_expand(stack):
    """The draft service answers a cascade in one call: each node says which level proposed it, a lookup chain
    comes first where the history repeats, and a level that sat out steps catches up."""
    _, running = stack
    address = running.spec.replica_addresses("draft")["draft"]
    with grpc.insecure_channel(address) as channel:
        stub = draft_pb2_grpc.DraftServiceStub(channel)
        levels = [level.name for level in stub.Describe(draft_pb2.DraftDescribeRequest()).replica.draft_levels]
        assert levels == ["small", "sparse", "lookup"]
        cascade = draft_pb2.CascadeBudget(max_returned_nodes=64, levels=[
            draft_pb2.LevelBudget(level="lookup", budget=draft_pb2.ExpandBudget(max_depth=3), acceptance=[0.9]),
            draft_pb2.LevelBudget(level="sparse", budget=draft_pb2.ExpandBudget(top_k=2, max_depth=2, max_breadth=2)),
            draft_pb2.LevelBudget(level="small", budget=draft_pb2.ExpandBudget(top_k=2, max_depth=2, max_breadth=2)),
        ])
        tokens = [5, 6, 7, 8, 9, 5, 6]

        def expand(new, start, budget):
            request = draft_pb2.ExpandRequest(sequences=[draft_pb2.DraftSequence(
                sequence_id="c", new_tokens=new, start_position=start)])
            if isinstance(budget, draft_pb2.CascadeBudget):
                request.cascade.CopyFrom(budget)
            else:
                request.budget.CopyFrom(budget)
            [reply] = stub.ExpandStream(iter([request]), timeout=30)
            assert reply.HasField("response"), reply.error.message
            return reply.response.trees[0]

        try:
            tree = expand(tokens, 0, cascade)
            assert list(tree.tree.tokens[1:4]) == [7, 8, 9] and list(tree.node_levels[:4]) == [-1, 0, 0, 0]
            assert set(tree.node_levels[4:]) <= {1, 2} and {1, 2} & set(tree.node_levels)
            # One plain step on the default level (small) alone, then the cascade again: sparse catches up.
            expand([7], len(tokens), draft_pb2.ExpandBudget(top_k=2, max_depth=1, max_breadth=2))
            again = expand([8], len(tokens) + 1, cascade)
            assert list(again.tree.tokens[1:2]) == [9] and again.node_levels[1] == 0
        finally:
            stub.Release(draft_pb2.DraftReleaseRequest(sequence_ids=["c"]))


def test_bad_cascades_name_the_field_and_the_service_keeps_serving(stack):
    _, running = stack
    address = running.spec.replica_addresses("draft")["draft"]
    bad = {
        "cascade.levels[0].level": draft_pb2.LevelBudget(level="medium"),
        "cascade.levels[0].acceptance": draft_pb2.LevelBudget(level="lookup", budget=draft_pb2.ExpandBudget(max_depth=2)),
        "cascade.levels[0]: budget.top_k": draft_pb2.LevelBudget(
            level="sparse", budget=draft_pb2.ExpandBudget(top_k=99, max_depth=1, max_breadth=1)),
    }
    with grpc.insecure_channel(address) as channel:
        stub = draft_pb2_grpc.DraftServiceStub(channel)
        for field, level in bad.items():
            request = draft_pb2.ExpandRequest(sequences=[draft_pb2.DraftSequence(sequence_id="bad", new_tokens=[1, 2])],
                                              cascade=draft_pb2.CascadeBudget(levels=[level]))
            [reply] = stub.ExpandStream(iter([request]), timeout=30)
            assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and field in reply.error.message
        good = draft_pb2.ExpandRequest(sequences=[draft_pb2.DraftSequence(sequence_id="bad", new_tokens=[1, 2])],
                                       cascade=draft_pb2.CascadeBudget(levels=[draft_pb2.LevelBudget(
                                           level="lookup", budget=draft_pb2.ExpandBudget(max_depth=2), acceptance=[1])]))
        [reply] = stub.ExpandStream(iter([good]), timeout=30)
        assert reply.HasField("response") and len(reply.response.trees[0].tree.tokens) == 1  # nothing to look up
        stub.Release(draft_pb2.DraftReleaseRequest(sequence_ids=["bad"]))


def test_a_target_alone_serves_the_cascade(stack_factory, target_model):
    """`cast up --target DIR` with no draft: the draft service serves sparse and lookup, `cascade` works, and so
    does `cast` (on the sparse level, the default when there is no small draft)."""
    running = stack_factory("target-only")
    model, tokenizer = target_model
    with grpc.insecure_channel(running.spec.replica_addresses("draft")["draft"]) as channel:
        replica = draft_pb2_grpc.DraftServiceStub(channel).Describe(draft_pb2.DraftDescribeRequest()).replica
    assert [level.name for level in replica.draft_levels] == ["sparse", "lookup"]
    assert replica.model_name.endswith("-sparse1") and all(level.cost_table.millis for level in replica.draft_levels)
    with grpc.insecure_channel(running.spec.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        for policy in ("cascade", "cast", "sparse", "lookup"):
            for prompt in REPETITIVE + ["def fibonacci(n):"]:
                response = generate(stub, prompt, policy, 24)
                assert list(response.token_ids) == greedy_reference(model, tokenizer, prompt, 24), policy
