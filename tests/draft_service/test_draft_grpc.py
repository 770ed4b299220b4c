"""The draft service over real gRPC on loopback: status codes naming fields, Release, TTL, health, reflection."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoTokenizer

from cast.v1 import draft_pb2, draft_pb2_grpc
from cast_runtime.identity import vocab_hash
from draft_service.config import DraftConfig
from draft_service.server import start_server
from tests.step_stub import StepStub

PROMPT = [5, 17, 99, 3, 200, 42, 7]
BUDGET = draft_pb2.ExpandBudget(top_k=4, max_depth=3, max_breadth=2)


@pytest.fixture
def config(draft_model_dir, onnx_cache_dir, exported) -> DraftConfig:
    return DraftConfig(model=draft_model_dir, host="127.0.0.1", port=0, provider="cpu", cache_dir=onnx_cache_dir)


async def serve(config: DraftConfig):
    server, port = await start_server(config)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, channel


@pytest.fixture
async def channel(config):
    server, channel = await serve(config)
    yield channel
    await channel.close()
    await server.stop(None)


def expand_request(*sequences, budget=BUDGET) -> draft_pb2.ExpandRequest:
    return draft_pb2.ExpandRequest(
        sequences=[draft_pb2.DraftSequence(sequence_id=s, new_tokens=t, start_position=p) for s, t, p in sequences],
        budget=budget,
    )


async def test_expand_returns_trees_and_model_time(channel):
    stub = StepStub(draft_pb2_grpc.DraftServiceStub(channel))
    reply = await stub.Expand(expand_request(("a", PROMPT, 0), ("b", [1, 2], 0)))
    assert [t.sequence_id for t in reply.trees] == ["a", "b"]
    assert reply.draft_seconds > 0
    tree = reply.trees[0]
    assert tree.tree.tokens[0] == PROMPT[-1] and tree.tree.parents[0] == -1
    assert [(s.candidates, s.kept) for s in tree.layers] == [(4, 2), (8, 2), (8, 0)]
    assert len(tree.tree.tokens) == len(tree.tree.parents) == len(tree.tree.values) == tree.expanded_nodes == 1 + 4 + 8 + 8
    assert all(s.kept_utility == 0 for s in tree.layers)  # set for CAST budgets only
    free = draft_pb2.CastBudget(node_buckets=[1], token_counts=[1], normalized_cost=[1e-6], gain_mean=1.0)
    cast = draft_pb2.ExpandBudget(top_k=BUDGET.top_k, max_depth=BUDGET.max_depth, max_breadth=BUDGET.max_breadth,
                                  cast=free)
    reply = await stub.Expand(expand_request(("d", PROMPT, 0), budget=cast))
    assert [s.kept for s in reply.trees[0].layers] == [s.kept for s in tree.layers]
    assert all(s.kept_utility > 0 for s in reply.trees[0].layers)
    trimmed = draft_pb2.ExpandBudget(top_k=BUDGET.top_k, max_depth=BUDGET.max_depth, max_breadth=BUDGET.max_breadth,
                                     max_returned_nodes=6)
    reply = await stub.Expand(expand_request(("c", PROMPT, 0), budget=trimmed))
    assert len(reply.trees[0].tree.tokens) == 6 and reply.trees[0].expanded_nodes == 1 + 4 + 8 + 8
    reply = await stub.Expand(expand_request(("a", [11, 12], len(PROMPT))))
    assert reply.trees[0].tree.tokens[0] == 12


BAD = [
    (expand_request(("a", PROMPT, 0), budget=draft_pb2.ExpandBudget(top_k=0, max_depth=2, max_breadth=2)),
     grpc.StatusCode.INVALID_ARGUMENT, "budget.top_k"),
    (expand_request(("a", PROMPT, 0), budget=draft_pb2.ExpandBudget(top_k=99, max_depth=2, max_breadth=2)),
     grpc.StatusCode.INVALID_ARGUMENT, "budget.top_k"),
    (expand_request(("a", PROMPT, 0), budget=draft_pb2.ExpandBudget(top_k=2, max_depth=-1, max_breadth=2)),
     grpc.StatusCode.INVALID_ARGUMENT, "budget.max_depth"),
    (expand_request(("a", PROMPT, 0), budget=draft_pb2.ExpandBudget(top_k=2, max_depth=2, max_breadth=0)),
     grpc.StatusCode.INVALID_ARGUMENT, "budget.max_breadth"),
    (expand_request(("a", PROMPT, 0), budget=draft_pb2.ExpandBudget(top_k=2, max_depth=2, max_breadth=2,
                                                                    max_returned_nodes=-3)),
     grpc.StatusCode.INVALID_ARGUMENT, "budget.max_returned_nodes"),
    (expand_request(("a", PROMPT, 0), budget=draft_pb2.ExpandBudget(
        top_k=2, max_depth=2, max_breadth=2,
        cast=draft_pb2.CastBudget(node_buckets=[1, 2], token_counts=[1], normalized_cost=[0.1]))),
     grpc.StatusCode.INVALID_ARGUMENT, "budget.cast.normalized_cost"),
    (expand_request(("a", PROMPT, 0), budget=draft_pb2.ExpandBudget(
        top_k=2, max_depth=2, max_breadth=2,
        cast=draft_pb2.CastBudget(node_buckets=[1], token_counts=[1], normalized_cost=[0.1], step_base_cost=-1))),
     grpc.StatusCode.INVALID_ARGUMENT, "budget.cast.step_base_cost"),
    (expand_request(("a", PROMPT, 0), budget=draft_pb2.ExpandBudget(
        top_k=2, max_depth=2, max_breadth=2,
        cast=draft_pb2.CastBudget(node_buckets=[1], token_counts=[1], normalized_cost=[0.1], depth_scales=[1.5, 2.0],
                                  sibling_scales=[1.0, float("nan")]))),
     grpc.StatusCode.INVALID_ARGUMENT, "budget.cast.sibling_scales[1]"),
    (expand_request(("a", PROMPT, 0), ("b", [1, 2, 3, 4, 5, 999], 0)),
     grpc.StatusCode.INVALID_ARGUMENT, "sequences[1].new_tokens[5]"),
    (expand_request(("a", PROMPT, 0), ("a", [1], 0)), grpc.StatusCode.INVALID_ARGUMENT, "sequences[1].sequence_id"),
    (expand_request(("a", [], 0)), grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].new_tokens"),
    (expand_request(("", [1], 0)), grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].sequence_id"),
    (expand_request(("a", [1], -3)), grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].start_position"),
    (expand_request(("ghost", [1], 4)), grpc.StatusCode.NOT_FOUND, "sequences[0].sequence_id"),
    (expand_request(("a", [1] * 2000, 0)), grpc.StatusCode.OUT_OF_RANGE, "sequences[0].new_tokens"),
]


async def test_each_bad_input_gets_its_code_and_field_and_the_stream_goes_on(channel):
    stub = draft_pb2_grpc.DraftServiceStub(channel)
    stream = stub.ExpandStream()
    for request, code, field in BAD:
        await stream.write(request)
        reply = await stream.read()
        assert reply.WhichOneof("result") == "error", field
        assert reply.error.code == code.value[0], (field, reply.error.message)
        assert reply.error.message.startswith(field + ":"), reply.error.message
        await stream.write(expand_request(("ok", [1, 2, 3], 0)))  # the same stream still serves
        reply = await stream.read()
        assert [t.sequence_id for t in reply.response.trees] == ["ok"] and reply.response.draft_seconds > 0
        await stub.Release(draft_pb2.DraftReleaseRequest(sequence_ids=["ok"]))
    await stream.done_writing()
    assert await stream.read() == grpc.aio.EOF
    assert await stream.code() == grpc.StatusCode.OK


async def test_a_start_past_the_cache_is_failed_precondition(channel):
    stub = StepStub(draft_pb2_grpc.DraftServiceStub(channel))
    await stub.Expand(expand_request(("a", PROMPT, 0)))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Expand(expand_request(("a", [1], len(PROMPT) + 3)))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details().startswith("sequences[0].start_position:")


async def test_release_then_expand_is_not_found(channel):
    stub = StepStub(draft_pb2_grpc.DraftServiceStub(channel))
    await stub.Expand(expand_request(("a", PROMPT, 0), ("b", PROMPT, 0)))
    describe = await stub.Describe(draft_pb2.DraftDescribeRequest())
    assert describe.replica.live_sequences == 2
    reply = await stub.Release(draft_pb2.DraftReleaseRequest(sequence_ids=["a", "b", "never-seen"]))
    assert reply.released == 2
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Expand(expand_request(("a", [1], len(PROMPT))))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await stub.Release(draft_pb2.DraftReleaseRequest(sequence_ids=["a"]))).released == 0


async def test_idle_sessions_expire_after_the_ttl(config):
    config.session_ttl_s = 0.3
    server, channel = await serve(config)
    try:
        stub = StepStub(draft_pb2_grpc.DraftServiceStub(channel))
        await stub.Expand(expand_request(("a", PROMPT, 0)))
        await asyncio.sleep(1.0)  # expiry runs every ttl / 2
        assert (await stub.Describe(draft_pb2.DraftDescribeRequest())).replica.live_sequences == 0
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Expand(expand_request(("a", [1], len(PROMPT))))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await channel.close()
        await server.stop(None)


async def test_health_serving_and_describe(channel, draft_model_dir):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "cast.v1.DraftService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    replica = (await draft_pb2_grpc.DraftServiceStub(channel).Describe(draft_pb2.DraftDescribeRequest())).replica
    assert replica.vocab_hash == vocab_hash(AutoTokenizer.from_pretrained(draft_model_dir).get_vocab())
    assert replica.model_name == draft_model_dir.name
    assert replica.vocab_size == 512 and replica.max_context == 1024
    assert (replica.device, replica.dtype, replica.backend) == ("cpu", "float32",
                                                                 "onnxruntime:CPUExecutionProvider+growing")
    assert replica.live_sequences == 0
    assert replica.max_sequences == DraftConfig.max_sessions  # its slots, which the orchestrator keeps within


async def test_reflection_lists_the_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for reply in call:
        names |= {s.name for s in reply.list_services_response.service}
    assert {"cast.v1.DraftService", "grpc.health.v1.Health"} <= names
