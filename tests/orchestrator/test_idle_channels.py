"""Idle channels (issue 17): the services admit the keepalive pings that the orchestrator's channels send, and a
step stream whose connection went away between steps is re-opened transparently, while a request that was already
written is never sent twice. Keepalive runs at 1 s here (CAST_GRPC_KEEPALIVE_TIME_MS), so these take seconds;
tests/integration/test_idle_stack.py idles a stack past the real defaults."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from cast.v1 import generation_pb2, generation_pb2_grpc, verify_pb2
from cast_core.tree import TokenTree
from orchestrator.clients import VerifyClient, VerifyItem
from orchestrator.config import OrchestratorConfig
from orchestrator.server import start_server
from tests.orchestrator.test_step_rpc import PROMPTS, start_services, stop_services

GREEDY = verify_pb2.SamplingParams()


async def test_the_services_admit_the_orchestrators_pings_on_idle_streams(tiny_pair, onnx_cache_dir, monkeypatch):
    """Clients ping every second. grpc's default server policy (the draft service's, and the verify service's too: its
    option was misnamed) admits one ping per 5 minutes without data; past two early pings it sends GOAWAY
    "too_many_pings" and closes the connection, which failed requests after an idle spell."""
    monkeypatch.setenv("CAST_GRPC_KEEPALIVE_TIME_MS", "1000")
    draft, verify = await start_services(tiny_pair)
    config = OrchestratorConfig(tokenizer_dir=tiny_pair[0], draft=f"127.0.0.1:{draft.port}",
                                verify=f"127.0.0.1:{verify.port}", port=0)
    server, port = await start_server(config)
    fleet = server.router.fleet
    draft_client, verify_client = fleet.serving("draft")[0].client, fleet.serving("verify")[0].client
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            request = generation_pb2.GenerateRequest(prompt="def f(x):", max_new_tokens=8, policy="eagle2")
            first = await stub.Generate(request, timeout=60)
            streams = draft_client.stream.call, verify_client.stream.call
            await asyncio.sleep(6)  # six pings per connection: GOAWAY after four under the old policy
            after = [await stub.Generate(request, timeout=60) for _ in range(3)]
        assert [r.token_ids for r in after] == [first.token_ids] * 3
        # The same streams carried them: no connection was closed, nothing needed re-opening.
        assert (draft_client.stream.call, verify_client.stream.call) == streams
        assert draft_client.stream.reopened == verify_client.stream.reopened == 0
    finally:
        await server.stop(None)
        await server.close()
        await stop_services(draft, verify)


class CuttableProxy:
    """A TCP proxy on loopback whose connections can be cut, as a load balancer or NAT drops an idle connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _connect(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    @staticmethod
    async def _pipe(reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers = []

    async def stop(self) -> None:
        self.cut()
        self.server.close()


@pytest.fixture
async def verify_behind_proxy(tiny_pair, onnx_cache_dir):
    """(verify service, proxy, client of the service through the proxy, on the step stream)."""
    draft, verify = await start_services(tiny_pair)
    proxy = CuttableProxy(verify.port)
    client = VerifyClient(f"127.0.0.1:{await proxy.start()}")
    yield verify, proxy, client
    await client.close()
    await proxy.stop()
    await stop_services(draft, verify)


def counting_verifies(verify, delay_s: float = 0.0) -> list[int]:
    """Spy on the verify service's model calls (each delayed by delay_s): the list grows by each batch's size."""
    calls: list[int] = []
    real = verify.servicer.verifier.verify_noting_captures

    def counted(items):
        calls.append(len(items))
        time.sleep(delay_s)
        return real(items)

    verify.servicer.verifier.verify_noting_captures = counted
    return calls


async def plain_steps(client: VerifyClient, sequence_id: str, tokens: list[int], steps: int, between=None) -> list[int]:
    """Greedy decoding with root-only trees: one token a step; `between()` runs between steps."""
    for step in range(steps):
        if step and between is not None:
            await between()
        (committed,), _, _ = await client.verify([VerifyItem(sequence_id, TokenTree.root_only(tokens[-1]), GREEDY)], 10)
        tokens = tokens + committed
    return tokens


async def test_a_step_stream_cut_between_steps_is_reopened_and_each_step_applied_once(verify_behind_proxy):
    verify, proxy, client = verify_behind_proxy
    await client.prefill({"alone": PROMPTS["x"], "cut": PROMPTS["x"]}, timeout=10)
    expected = await plain_steps(client, "alone", PROMPTS["x"], steps=5)
    calls = counting_verifies(verify)

    cuts = 0

    async def cut():
        """Odd cuts: the client's event loop runs meanwhile and sees its stream end. Even cuts: the loop is busy
        (a long step's bookkeeping) while the connection goes, so only the grpc core knows, and the next write fails."""
        nonlocal cuts
        cuts += 1
        proxy.cut()
        for _ in range(3):
            await asyncio.sleep(0)  # the proxy's sockets close
        if cuts % 2:
            await asyncio.sleep(0.3)
        else:
            time.sleep(0.3)

    tokens = await plain_steps(client, "cut", PROMPTS["x"], steps=5, between=cut)
    assert tokens == expected  # every step applied exactly once: a replay would have moved the sequence on twice
    assert calls == [1] * 5
    assert client.stream.reopened == 2  # the steps after the even cuts: their writes failed, so they went again
    assert verify.servicer.verifier.sessions.get("cut").kv.length == len(tokens) - 1


async def test_a_request_written_before_the_connection_broke_is_not_sent_again(verify_behind_proxy):
    verify, proxy, client = verify_behind_proxy
    await client.prefill({"s": PROMPTS["y"]}, timeout=10)
    tokens = await plain_steps(client, "s", PROMPTS["y"], steps=1)
    calls = counting_verifies(verify, delay_s=0.5)  # a long Verify: the connection breaks while it runs
    step = asyncio.create_task(client.verify([VerifyItem("s", TokenTree.root_only(tokens[-1]), GREEDY)], 10))
    await asyncio.sleep(0.2)
    assert calls == [1]  # the request is with the service
    proxy.cut()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await step
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await asyncio.sleep(0.5)  # the service finishes the request it received
    # It applied the request; the client did not send it again (the sequence moved on by one step, not two).
    assert calls == [1]
    assert verify.servicer.verifier.sessions.get("s").kv.length == len(tokens)
    # ... and the next step, on a fresh stream, goes on from there.
    (committed,), _, _ = await client.verify(
        [VerifyItem("s", TokenTree.root_only(verify.servicer.verifier.sessions.get("s").pending), GREEDY)], 10)
    assert len(committed) == 1
