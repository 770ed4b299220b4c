"""Many clients that leave at random points, all at once, leave no session behind on the draft or the verify
service: gRPC deadlines from milliseconds up, streams cancelled before, at and after their first token, HTTP clients
that hang up mid-stream. Once against the shared stack (separate processes), once against services in this process
whose model calls are slowed and an orchestrator whose downstream calls time out (replays, with their releases)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter

import grpc

from cast.v1 import generation_pb2, generation_pb2_grpc
from orchestrator.config import OrchestratorConfig
from orchestrator.server import start_server
from tests.integration.stacks import prompts_for_tests
from tests.integration.test_bad_input import live_sequences, wait_until_released
from tests.orchestrator.test_step_rpc import start_services, stop_services

FATES = ("deadline", "cancel_at_once", "cancel_after_first", "cancel_mid", "http_hang_up", "complete")
POLICIES = ("cast", "eagle2", "chain", "ar")


async def leave(stub, http: tuple[str, int] | None, rng: random.Random, prompt: str, fate: str) -> str:
    """One request that ends as `fate` says; returns how it ended (a status name, "cancelled", "OK")."""
    request = generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=rng.randint(1, 150), ignore_eos=True,
                                             policy=rng.choice(POLICIES))
    try:
        if fate == "deadline":
            await stub.Generate(request, timeout=rng.choice([0.002, 0.02, 0.1, 0.3, 0.6]))
        elif fate == "complete":
            request.max_new_tokens = rng.randint(1, 12)
            await stub.Generate(request, timeout=120)
        elif fate == "http_hang_up":
            await hang_up(http, request, rng)
            return "hung up"
        else:
            call = stub.GenerateStream(request, timeout=120)
            if fate == "cancel_at_once":
                await asyncio.sleep(rng.uniform(0, 0.05))
            else:
                for _ in range(1 if fate == "cancel_after_first" else rng.randint(2, 6)):
                    if await call.read() is grpc.aio.EOF:
                        break
            call.cancel()
            return "cancelled"
    except grpc.aio.AioRpcError as e:
        return e.code().name
    except asyncio.CancelledError:  # (grpc.aio raises it from a call cancelled while awaited)
        return "cancelled"
    return "OK"


async def hang_up(http: tuple[str, int], request: generation_pb2.GenerateRequest, rng: random.Random) -> None:
    """A streaming HTTP completion whose client closes the connection after a few bytes of it, or before any."""
    body = json.dumps({"model": "target", "prompt": request.prompt, "max_tokens": request.max_new_tokens,
                       "temperature": 0, "stream": True,
                       "cast": {"policy": request.policy, "ignore_eos": True}}).encode()
    reader, writer = await asyncio.open_connection(*http)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    wanted = rng.choice([0, 1, 400, 2000])  # bytes read before hanging up: 0 (at once), the headers, some events
    try:
        async with asyncio.timeout(rng.uniform(0.01, 0.5)):
            got = 0
            while got < wanted and (chunk := await reader.read(512)):
                got += len(chunk)
    except TimeoutError:
        pass
    writer.transport.abort()  # no FIN handshake: the connection just goes


async def crowd(address: str, http: tuple[str, int] | None, requests: int, concurrency: int, seed: int) -> Counter:
    """`requests` requests of random fates, `concurrency` at a time; how they ended, by fate."""
    rng = random.Random(seed)
    prompts = prompts_for_tests(12)
    fates = [f for f in FATES if http is not None or f != "http_hang_up"]
    plan = [(rng.choice(prompts), rng.choice(fates), random.Random(rng.random())) for _ in range(requests)]
    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        async def one(prompt, fate, own_rng):
            async with gate:
                await asyncio.sleep(own_rng.uniform(0, 0.02))  # arrivals spread over the steps
                return fate, await leave(stub, http, own_rng, prompt, fate)

        ended = await asyncio.gather(*(one(*p) for p in plan))
    return Counter(ended)


def exercised(ended: Counter) -> None:
    """The crowd did what it claims: requests cut short at each kind of point, and some that completed."""
    fates = {fate for fate, _ in ended}
    assert {"deadline", "cancel_at_once", "cancel_after_first", "cancel_mid", "complete"} <= fates, ended
    assert ended["deadline", "DEADLINE_EXCEEDED"] > 0 and ended["complete", "OK"] > 0, ended


async def test_a_crowd_of_leaving_clients_leaves_no_session(tiny_stack):
    assert await asyncio.to_thread(wait_until_released, tiny_stack) == (0, 0)  # an earlier test's, still releasing
    host, port = tiny_stack.spec.host, tiny_stack.spec.http_port
    started = time.monotonic()
    ended = await crowd(tiny_stack.spec.address, (host, port), requests=160, concurrency=24, seed=1)
    print(f"{time.monotonic() - started:.1f} s:", dict(ended))
    exercised(ended)
    assert await asyncio.to_thread(wait_until_released, tiny_stack, 10.0) == (0, 0)


def draft_sessions(draft) -> int:
    """The draft service's sequences, and every level's cache of one (Describe counts the former)."""
    expander = draft.servicer.expander
    return len(expander.sessions) + sum(len(m.sessions) for m in getattr(expander, "models", {}).values())


def slowed(rng: random.Random, fn, most_s: float):
    """fn, each call delayed by up to most_s on the service's worker thread (its queue grows meanwhile)."""
    def slow(*args, **kwargs):
        time.sleep(rng.uniform(0, most_s))
        return fn(*args, **kwargs)
    return slow


async def test_leaving_clients_of_a_slow_verifier_whose_calls_time_out_leave_no_session(tiny_pair, onnx_cache_dir):
    """A verifier that answers late (so Prefills and Verifies pass the orchestrator's deadline: the replica goes down,
    its sequences are replayed and their old sessions released, while clients cancel) and a draft that does too."""
    draft, verify = await start_services(tiny_pair, max_batch=8)
    rng = random.Random(3)
    verifier = verify.servicer.verifier
    verifier.prefill = slowed(rng, verifier.prefill, 0.3)
    verifier.verify_noting_captures = slowed(rng, verifier.verify_noting_captures, 0.3)
    draft.servicer.timed_expand = slowed(rng, draft.servicer.timed_expand, 0.05)
    config = OrchestratorConfig(tokenizer_dir=tiny_pair[0], draft=f"127.0.0.1:{draft.port}",
                                verify=f"127.0.0.1:{verify.port}", port=0, rpc_timeout_s=0.25, refresh_s=0.2)
    orchestrator, port = await start_server(config)
    try:
        ended = await crowd(f"127.0.0.1:{port}", None, requests=120, concurrency=16, seed=2)
        print(dict(ended), "replays:", orchestrator.router.replays)
        assert orchestrator.router.replays > 0  # the deadlines did cut calls short
        deadline = time.monotonic() + 10
        while (live := (len(verifier.sessions), draft_sessions(draft))) != (0, 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert live == (0, 0), dict(ended)
        assert verifier.kv.owners == []  # every KV slot is free again
    finally:
        await orchestrator.stop(None)
        await orchestrator.close()
        await stop_services(draft, verify)


async def test_a_verifier_that_stalls_past_the_release_deadline_gets_its_sessions_released(tiny_stack):
    """The shared stack's verify process stalls (SIGSTOP: a long pause, an overloaded host) under an orchestrator of
    short deadlines: the step's Verify times out, the sequences leave the replica (its release times out too) and
    wait for a replica, and their clients leave meanwhile. Once the verifier answers again, nothing is left on it
    or on the draft replica, which served throughout."""
    assert await asyncio.to_thread(wait_until_released, tiny_stack) == (0, 0)
    addresses = tiny_stack.addresses()
    config = OrchestratorConfig(tokenizer_dir=tiny_stack.spec.target_dir, draft=addresses["draft"],
                                verify=addresses["verify"], port=0, rpc_timeout_s=1.0, refresh_s=0.5)
    orchestrator, port = await start_server(config)
    verify = tiny_stack.processes["verify"]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            calls = [stub.GenerateStream(generation_pb2.GenerateRequest(
                prompt="import os\n", max_new_tokens=3000, ignore_eos=True, policy=policy), timeout=120)
                for policy in ("eagle2", "eagle2", "chain", "ar")]
            for call in calls:
                for _ in range(3):  # drafting from the second step on
                    await call.read()
            assert await asyncio.to_thread(live_sequences, tiny_stack) == (3, 4)
            os.kill(verify.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(2.0)  # the Verify's deadline (1 s) passed: the sequences wait for a replica
                for call in calls:
                    call.cancel()
                await asyncio.sleep(6.0)  # past the deadline of the release of their verify sessions (5 s)
            finally:
                os.kill(verify.pid, signal.SIGCONT)
        assert orchestrator.router.replays >= 4
        assert await asyncio.to_thread(wait_until_released, tiny_stack, 15.0) == (0, 0)
    finally:
        await orchestrator.stop(None)
        await orchestrator.close()
    # The stack's own orchestrator saw the stall too: it serves again.
    async with grpc.aio.insecure_channel(tiny_stack.spec.address) as channel:
        reply = await generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            generation_pb2.GenerateRequest(prompt="def f():", max_new_tokens=4, ignore_eos=True), timeout=60)
    assert reply.usage.completion_tokens == 4
