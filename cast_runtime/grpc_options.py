"""gRPC options shared by the orchestrator's channels and every service's server: keepalive and message sizes.

A client pings an open connection every KEEPALIVE_TIME_MS while it has calls (the step streams are always open).
A server whose policy does not admit those pings counts each as a strike and, at the third, sends GOAWAY
ENHANCE_YOUR_CALM "too_many_pings" and closes the connection: grpc's default policy admits one ping per 5 minutes
without data, so an idle stack failed its next requests. Clients and servers read the interval from here.
"""

from __future__ import annotations

import os

KEEPALIVE_TIME_MS = 30_000    # how often a client pings a connection that has calls (CAST_GRPC_KEEPALIVE_TIME_MS)
KEEPALIVE_TIMEOUT_MS = 10_000  # no ack in this long: the connection is dead
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # long prompts in one Prefill or Expand pass grpc's 4 MiB default


def keepalive_time_ms() -> int:
    """The clients' ping interval; the environment variable lets tests shorten it (for clients and servers alike)."""
    return int(os.environ.get("CAST_GRPC_KEEPALIVE_TIME_MS", KEEPALIVE_TIME_MS))


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", keepalive_time_ms()),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Keep pinging an idle open stream at that interval: by default a client sends two pings without data, then
        # one a minute, and a dead connection goes unnoticed longer.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def server_options() -> list[tuple[str, int]]:
    """Admit the clients' pings: every third of their interval (room for timer skew, and for third-party clients of
    the public API that ping more often), with or without calls."""
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_time_ms() // 3),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
