"""The token file and the per-client limits (orchestrator/auth.py), on their own."""

from __future__ import annotations

import asyncio
import os

import pytest

from cast_core.errors import ResourceExhausted
from orchestrator.auth import CLIENT, ClientLimits, PermissionDenied, TokenFile, Unauthenticated, parse_tokens

ALICE, BOB = "alice-token-0123456789", "bob-token-abcdefghijkl"


def test_token_file_names_clients_and_refuses_the_rest(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# clients\n{ALICE} alice\n\n{BOB}\n")
    tokens = TokenFile(path)
    assert tokens.client_of(f"Bearer {ALICE}") == "alice"
    assert tokens.client_of(f"bearer {BOB}").startswith("client-")  # unnamed: named by its hash
    assert ALICE not in repr(tokens) and all(ALICE.encode() not in k for k in tokens.clients)  # only hashes kept
    for missing in (None, "", "Bearer ", f"Basic {ALICE}", ALICE):
        with pytest.raises(Unauthenticated):
            tokens.client_of(missing)
    with pytest.raises(PermissionDenied):
        tokens.client_of("Bearer not-a-known-token-at-all")


def test_token_file_is_read_again_when_it_changes(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{ALICE} alice\n")
    tokens = TokenFile(path)
    path.write_text(f"{BOB} bob\n")  # alice revoked, bob added
    os.utime(path, ns=(1, 10**18))   # a distinct mtime even on coarse clocks
    assert tokens.client_of(f"Bearer {BOB}") == "bob"
    with pytest.raises(PermissionDenied):
        tokens.client_of(f"Bearer {ALICE}")
    path.write_text("short\n")       # a broken file: the previous tokens stay
    os.utime(path, ns=(1, 2 * 10**18))
    assert tokens.client_of(f"Bearer {BOB}") == "bob"


@pytest.mark.parametrize("text, message", [("", "no tokens"), ("short alice", "at least 16"),
                                           (f"{ALICE} a\n{ALICE} b", "listed twice")])
def test_bad_token_files_name_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_tokens(text)


async def test_client_limits_queue_then_refuse_naming_the_limits():
    limits = ClientLimits(max_live=2, max_queued=1)
    release = asyncio.Event()
    started: list[int] = []

    async def request(i: int, client: str = "alice") -> None:
        async with limits.admitted(client):
            started.append(i)
            await release.wait()

    tasks = [asyncio.create_task(request(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert started == [0, 1] and limits.live("alice") == 2  # the third waits
    with pytest.raises(ResourceExhausted, match="client_max_live=2 and client_max_queued=1"):
        await request(3)
    bob = asyncio.create_task(request(9, "bob"))  # another client is not held back by alice
    await asyncio.sleep(0.01)
    assert 9 in started
    release.set()
    await asyncio.gather(*tasks, bob)
    assert sorted(started) == [0, 1, 2, 9] and limits.clients == {}  # nothing left behind


async def test_a_cancelled_waiter_leaves_its_place_and_its_slot():
    limits = ClientLimits(max_live=1, max_queued=2)
    release = asyncio.Event()

    async def hold():
        async with limits.admitted("alice"):
            await release.wait()

    first = asyncio.create_task(hold())
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert len(limits.clients["alice"].waiting) == 0
    release.set()
    await first
    assert limits.clients == {}


async def test_limited_generate_holds_a_slot_only_while_it_runs():
    limits = ClientLimits(max_live=1, max_queued=0)
    closed = []

    async def generate(request):
        try:
            for i in range(3):
                yield i
        finally:
            closed.append(request)

    generate_limited = limits.limit(generate)
    CLIENT.set("alice")
    stream = generate_limited("r1")
    assert await anext(stream) == 0
    with pytest.raises(ResourceExhausted):
        await anext(generate_limited("r2"))
    await stream.aclose()  # the client went away: the router's generator is closed too, and the slot is free
    assert closed == ["r1"] and limits.clients == {}
    assert [c async for c in generate_limited("r3")] == [0, 1, 2]
