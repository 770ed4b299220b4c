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
