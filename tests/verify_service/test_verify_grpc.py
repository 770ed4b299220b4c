"""The verify service over real gRPC on loopback: status codes, sessions, TTL, health, reflection, Describe."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoTokenizer

from cast.v1 import common_pb2, verify_pb2, verify_pb2_grpc
from cast_runtime.identity import vocab_hash
from verify_service.config import VerifyConfig
from tests.step_stub import StepStub
from verify_service.server import start_server

MAX_CONTEXT = 64


def config_for(tiny_pair, **overrides) -> VerifyConfig:
    settings = dict(
        model=tiny_pair[0], host="127.0.0.1", port=0, dtype="float64", device="cpu", max_context=MAX_CONTEXT,
        max_batch=4,
    )
    return VerifyConfig(**(settings | overrides))


@pytest.fixture
async def serve(tiny_pair):
    """serve(**config overrides) -> a VerifyService stub on a fresh server; everything stops at teardown."""
    servers, channels = [], []

    async def start(**overrides):
        server, port = await start_server(config_for(tiny_pair, **overrides))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        servers.append(server)
        channels.append(channel)
        return StepStub(verify_pb2_grpc.VerifyServiceStub(channel))

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(None)


def tree(tokens, parents):
    depths = [0] * len(tokens)
    for i in range(1, len(tokens)):
        depths[i] = depths[parents[i]] + 1
    return common_pb2.TokenTree(tokens=tokens, parents=parents, depths=depths, values=[1.0] * len(tokens))


def prefill(sequence_id, tokens):
    return verify_pb2.PrefillRequest(sequences=[verify_pb2.PrefillSequence(sequence_id=sequence_id, token_ids=tokens)])


def verify(*sequences):
    return verify_pb2.VerifyRequest(sequences=[verify_pb2.VerifySequence(**s) for s in sequences])


PROMPT = [5, 6, 7]  # pending token 7


def root(sequence_id="s", token=7, **extra):
    return dict(sequence_id=sequence_id, tree=tree([token], [-1]), **extra)


# (name, extra setup requests, bad request method, bad request, code, field named in the message)
BAD_REQUESTS = [
    ("empty prompt", "Prefill", prefill("new", []), grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].token_ids"),
    ("prompt too long", "Prefill", prefill("new", [1] * (MAX_CONTEXT + 1)), grpc.StatusCode.OUT_OF_RANGE,
     "sequences[0].token_ids"),
    ("existing id", "Prefill", prefill("s", [1, 2]), grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].sequence_id"),
    ("duplicate prefill ids", "Prefill",
     verify_pb2.PrefillRequest(sequences=[verify_pb2.PrefillSequence(sequence_id="x", token_ids=[1])] * 2),
     grpc.StatusCode.INVALID_ARGUMENT, "sequences[1].sequence_id"),
    ("prompt token outside vocab", "Prefill", prefill("new", [1, 10_000]), grpc.StatusCode.INVALID_ARGUMENT,
     "sequences[0].token_ids[1]"),
    ("unknown id", "Verify", verify(root("nope")), grpc.StatusCode.NOT_FOUND, "sequences[0].sequence_id"),
    ("duplicate verify ids", "Verify", verify(root(), root()), grpc.StatusCode.INVALID_ARGUMENT,
     "sequences[1].sequence_id"),
    ("parent after child", "Verify", verify(dict(sequence_id="s", tree=common_pb2.TokenTree(
        tokens=[7, 8, 9], parents=[-1, 2, 0], depths=[0, 1, 1], values=[1, 1, 1]))),
     grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].tree.parents[1]"),
    ("parent out of range", "Verify", verify(dict(sequence_id="s", tree=common_pb2.TokenTree(
        tokens=[7, 8], parents=[-1, 5], depths=[0, 1], values=[1, 1]))),
     grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].tree.parents[1]"),
    ("depth mismatch", "Verify", verify(dict(sequence_id="s", tree=common_pb2.TokenTree(
        tokens=[7, 8, 9], parents=[-1, 0, 1], depths=[0, 1, 3], values=[1, 1, 1]))),
     grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].tree.depths[2]"),
    ("tree token outside vocab", "Verify", verify(dict(sequence_id="s", tree=tree([7, 99_999], [-1, 0]))),
     grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].tree.tokens[1]"),
    ("root is not the pending token", "Verify", verify(root(token=8)), grpc.StatusCode.FAILED_PRECONDITION,
     "sequences[0].tree.tokens[0]"),
    ("context overflow", "Verify",
     verify(dict(sequence_id="s", tree=tree([7] + [1] * (MAX_CONTEXT - 2), [-1] + list(range(MAX_CONTEXT - 2))))),
     grpc.StatusCode.OUT_OF_RANGE, "sequences[0].tree.depths"),
    ("negative temperature", "Verify", verify(root(sampling=verify_pb2.SamplingParams(temperature=-0.5))),
     grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].sampling.temperature"),
    ("NaN temperature", "Verify", verify(root(sampling=verify_pb2.SamplingParams(temperature=float("nan")))),
     grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].sampling.temperature"),
    ("top_p above 1", "Verify", verify(root(sampling=verify_pb2.SamplingParams(temperature=0.7, top_p=1.5))),
     grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].sampling.top_p"),
    ("negative top_p", "Verify", verify(root(sampling=verify_pb2.SamplingParams(temperature=0.7, top_p=-0.1))),
     grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].sampling.top_p"),
    ("negative top_k", "Verify", verify(root(sampling=verify_pb2.SamplingParams(temperature=0.7, top_k=-1))),
     grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].sampling.top_k"),
    ("second of a batch is bad", "Verify", verify(root(), root("nope")), grpc.StatusCode.NOT_FOUND,
     "sequences[1].sequence_id"),
]


@pytest.mark.parametrize("method, request_, code, field", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
async def test_bad_request_gets_its_code_and_the_service_still_serves(serve, method, request_, code, field):
    stub = await serve()
    await stub.Prefill(prefill("s", PROMPT))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(stub, method)(request_)
    assert info.value.code() == code
    assert field in info.value.details()
    # The sequence is untouched (same pending token) and a good request works.
    response = await stub.Verify(verify(root()))
    assert len(response.results[0].committed_tokens) == 1 and response.verify_seconds > 0
    await stub.Prefill(prefill("another", [1, 2]))


async def test_bad_verify_on_the_stream_gets_its_status_and_the_stream_goes_on(serve):
    stub = await serve()
    await stub.Prefill(prefill("s", PROMPT))
    await stub.Prefill(prefill("good", PROMPT))
    stream = stub.VerifyStream()
    pending = PROMPT[-1]
    for name, method, request_, code, field in BAD_REQUESTS:
        if method != "Verify":
            continue
        await stream.write(request_)
        reply = await stream.read()
        assert reply.WhichOneof("result") == "error", name
        assert reply.error.code == code.value[0], (name, reply.error.message)
        assert field in reply.error.message
        await stream.write(verify(root("good", token=pending)))  # the same stream still serves
        (result,) = (await stream.read()).response.results
        pending = result.committed_tokens[-1]
    await stream.done_writing()
    assert await stream.read() == grpc.aio.EOF
    assert await stream.code() == grpc.StatusCode.OK


async def test_session_cap_is_resource_exhausted(serve):
    stub = await serve(max_batch=2)
    await stub.Prefill(prefill("a", [1]))
    await stub.Prefill(prefill("b", [1]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Prefill(prefill("c", [1]))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await stub.Release(verify_pb2.VerifyReleaseRequest(sequence_ids=["a"]))
    await stub.Prefill(prefill("c", [1]))


async def test_verify_commits_tokens_and_reports_accepted_nodes(serve):
    stub = await serve()
    await stub.Prefill(prefill("s", PROMPT))
    first = (await stub.Verify(verify(root()))).results[0]
    (bonus,) = first.committed_tokens
    # Next step: the root is the bonus token; guess right with the first AR step's own output chain.
    second = (await stub.Verify(verify(root(token=bonus)))).results[0]
    (after,) = second.committed_tokens
    await stub.Prefill(prefill("t", PROMPT))
    result = (await stub.Verify(verify(dict(sequence_id="t", tree=tree([7, 1, bonus, after], [-1, 0, 0, 2]))))).results[0]
    assert result.sequence_id == "t"
    assert list(result.accepted_nodes) == [2, 3]
    assert list(result.committed_tokens)[:2] == [bonus, after] and len(result.committed_tokens) == 3


async def test_seeded_sampling_over_grpc_is_reproducible(serve):
    """Two sessions with one prompt and seed commit the same tokens; top_p left unset (0) means off."""
    stub = await serve()
    sampling = verify_pb2.SamplingParams(temperature=1.0, top_k=50, seed=1234, has_seed=True)
    outputs = []
    for sequence_id in ("a", "b"):
        await stub.Prefill(prefill(sequence_id, PROMPT))
        pending, out = 7, []
        for _ in range(6):
            result = (await stub.Verify(verify(root(sequence_id, token=pending, sampling=sampling)))).results[0]
            out += result.committed_tokens
            pending = out[-1]
        outputs.append(out)
    assert outputs[0] == outputs[1]


async def test_release_frees_the_session(serve):
    stub = await serve()
    await stub.Prefill(prefill("s", PROMPT))
    released = await stub.Release(verify_pb2.VerifyReleaseRequest(sequence_ids=["s", "never-existed"]))
    assert released.released == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Verify(verify(root()))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    await stub.Prefill(prefill("s", PROMPT))  # the id can be used again


async def test_idle_sessions_expire(serve):
    stub = await serve(session_ttl_s=0.3)
    await stub.Prefill(prefill("idle", PROMPT))
    await stub.Prefill(prefill("busy", PROMPT))
    pending = 7
    for _ in range(8):  # keep "busy" in use while "idle" ages
        await asyncio.sleep(0.1)
        pending = (await stub.Verify(verify(root("busy", token=pending)))).results[0].committed_tokens[-1]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Verify(verify(root("idle")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_describe(serve, tiny_pair):
    stub = await serve()
    description = (await stub.Describe(verify_pb2.VerifyDescribeRequest())).replica
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    assert description.vocab_hash == vocab_hash(tokenizer.get_vocab())
    assert description.vocab_size == len(tokenizer)
    assert description.max_context == MAX_CONTEXT
    assert (description.device, description.dtype, description.backend) == ("cpu", "float64", "torch")
    assert description.model_name == "target"
    assert description.max_sequences == 4  # the session cap (config_for's max_sessions): the orchestrator's limit


async def test_health_is_serving_and_reflection_lists_the_service(tiny_pair):
    server, port = await start_server(config_for(tiny_pair))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "cast.v1.VerifyService"):
                response = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert response.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = reflection.ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            reply = await call.read()
            await call.done_writing()
            names = {s.name for s in reply.list_services_response.service}
            assert "cast.v1.VerifyService" in names
    finally:
        await server.stop(None)


async def test_verify_requests_that_wait_for_the_model_run_as_one_forward(tiny_pair):
    """Orchestrators sharing a replica, each on its own stream: what arrives while the model is busy runs in one
    forward, each request gets its own results, and a bad request among them fails alone."""
    from verify_service.server import start

    running = await start(config_for(tiny_pair, max_batch=8))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    verifier = running.servicer.verifier
    forwards = []
    run = verifier.verify_noting_captures

    def recording(items):
        forwards.append(sorted(i.sequence_id for i in items))
        return run(items)

    verifier.verify_noting_captures = recording
    try:
        stub = verify_pb2_grpc.VerifyServiceStub(channel)
        for s in ("a", "b", "a2", "b2", "c2", "a3", "b3"):
            await stub.Prefill(prefill(s, PROMPT))
        chain = tree([7, 3, 9], [-1, 0, 1])
        streams = [StepStub(stub) for _ in range(3)]  # one stream each, as separate orchestrators have
        alone = [list((await streams[0].Verify(verify(dict(sequence_id=s, tree=chain)))).results[0].committed_tokens)
                 for s in ("a", "b")]

        async def together(requests):
            running.servicer.executor.submit(time.sleep, 0.5)  # the model is busy while they arrive
            return await asyncio.gather(*(st.Verify(r) for st, r in zip(streams, requests)), return_exceptions=True)

        forwards.clear()
        replies = await together([verify(dict(sequence_id=s, tree=chain)) for s in ("a2", "b2")])
        assert forwards == [["a2", "b2"]]
        assert [list(r.results[0].committed_tokens) for r in replies] == alone

        forwards.clear()
        replies = await together([verify(dict(sequence_id="a3", tree=chain)), verify(root("c2", token=8)),
                                  verify(dict(sequence_id="b3", tree=chain))])
        assert isinstance(replies[1], grpc.aio.AioRpcError) and replies[1].code() == grpc.StatusCode.FAILED_PRECONDITION
        assert [list(replies[i].results[0].committed_tokens) for i in (0, 2)] == alone
        assert forwards[0] == ["a3", "b3", "c2"]  # one forward tried, then each alone, in the order they arrived
        assert sorted(forwards[1:]) == [["a3"], ["b3"], ["c2"]]
    finally:
        await channel.close()
        await running.server.stop(None)
