"""Keepalive: a server built with server_options() admits the pings of a channel built with channel_options(), so
an open stream (the orchestrator's step streams are always open) outlives several ping intervals of idleness.
Under grpc's default server policy the same stream ends at the third ping with "Too many pings" (issue 17: at the
real 30 s interval, 90.0 s measured). The interval is shortened to 1 s (CAST_GRPC_KEEPALIVE_TIME_MS, which clients
and servers read alike)."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cast_runtime.grpc_options import channel_options, server_options

INTERVAL_S = 1.0


async def idle_stream_survives(options: list[tuple[str, int]], idle_s: float) -> bool:
    """Whether an open Watch stream on a server with these options is still open after `idle_s` of no messages."""
    server = grpc.aio.server(options=options)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            await stream.read()  # SERVING; no other message comes while it stays open
            try:
                await asyncio.wait_for(stream.read(), timeout=idle_s)
            except asyncio.TimeoutError:
                return True
            except grpc.aio.AioRpcError as exc:
                assert "ping" in (exc.details() or "").lower(), exc
                return False
            raise AssertionError("the Watch stream sent a second message")
    finally:
        await server.stop(None)


async def test_our_servers_admit_our_channels_pings_and_grpcs_default_policy_does_not(monkeypatch):
    monkeypatch.setenv("CAST_GRPC_KEEPALIVE_TIME_MS", str(int(INTERVAL_S * 1000)))
    ours, default = await asyncio.gather(idle_stream_survives(server_options(), 6 * INTERVAL_S),
                                         idle_stream_survives([], 6 * INTERVAL_S))
    assert ours
    assert not default  # the control: without the options, the third ping ends it
