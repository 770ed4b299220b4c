"""Continuous batching: concurrent requests share steps, stay lossless, and admission control answers at once."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cast.v1 import generation_pb2, generation_pb2_grpc
from orchestrator.config import OrchestratorConfig
from orchestrator.server import start_server
from tests.integration.stacks import prompts_for_tests
from tests.orchestrator.test_step_rpc import start_services, stop_services


def generate(stub, prompt: str, policy: str, n: int):
    return stub.Generate(generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=n, policy=policy), timeout=300)


@pytest.mark.parametrize("policy", ["cast", "eagle2", "ar"])
def test_sixteen_concurrent_requests_equal_their_solo_runs(generation_stub, policy):
    prompts = prompts_for_tests(16)
    lengths = [8 + 5 * (i % 5) for i in range(16)]
    alone = [list(generate(generation_stub, p, policy, n).token_ids) for p, n in zip(prompts, lengths)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda pn: generate(generation_stub, pn[0], policy, pn[1]), zip(prompts, lengths)))
    assert [list(r.token_ids) for r in together] == alone


async def test_admission_control_answers_resource_exhausted_at_once(tiny_stack):
    addrs = tiny_stack.addresses()
    config = OrchestratorConfig(
        tokenizer_dir=tiny_stack.spec.target_dir, draft=addrs["draft"], verify=addrs["verify"],
        port=0, max_live=1, max_queued=1,
    )
    server, port = await start_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            long = generation_pb2.GenerateRequest(prompt="import os\n", max_new_tokens=300, ignore_eos=True, policy="ar")
            first = stub.GenerateStream(long)   # becomes live
            await first.read()
            second = stub.GenerateStream(long)  # waits in the queue
            await asyncio.sleep(0.3)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Generate(long, timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            first.cancel()
            # The queued request runs once the live one leaves.
            chunk = await second.read()
            assert chunk.token_ids
            second.cancel()
    finally:
        await server.stop(None)
        await server.close()  # as serve() does: the sequences' sessions go too


async def test_more_requests_than_the_verifier_has_slots_wait_and_all_complete(tiny_pair, onnx_cache_dir):
    """A verify service that holds 2 sequences, 6 concurrent requests: the orchestrator takes the limit from Describe
    and queues the rest (a Prefill past the limit would fail), and every output equals its solo run."""
    draft, verify = await start_services(tiny_pair, max_batch=2)
    config = OrchestratorConfig(tokenizer_dir=tiny_pair[0], draft=f"127.0.0.1:{draft.port}",
                                verify=f"127.0.0.1:{verify.port}", port=0)
    server, port = await start_server(config)
    held = []  # the verifier's live sessions at each Verify
    real_verify = verify.servicer.verifier.verify

    def verify_noting_sessions(items):
        held.append(len(verify.servicer.verifier.sessions))
        return real_verify(items)

    verify.servicer.verifier.verify = verify_noting_sessions
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            requests = [generation_pb2.GenerateRequest(prompt=p, max_new_tokens=6 + 3 * i, policy="eagle2")
                        for i, p in enumerate(prompts_for_tests(6))]
            alone = [(await stub.Generate(r, timeout=120)).token_ids for r in requests]
            together = await asyncio.gather(*(stub.Generate(r, timeout=300) for r in requests))
        assert [r.token_ids for r in together] == alone
        assert max(held) == 2
        assert [loop.max_live for loop in server.router.loops.values()] == [2] and config.max_live > 2
    finally:
        await server.stop(None)
        await server.close()
        await stop_services(draft, verify)
