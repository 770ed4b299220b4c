"""A stack left idle past the real keepalive defaults serves its next requests (issue 17: after 90 s or more idle,
the services sent the orchestrator's channels GOAWAY "too_many_pings" and the next requests failed)."""

from __future__ import annotations

import time

import pytest

from cast.v1 import generation_pb2


@pytest.mark.slow
def test_requests_after_100_s_idle_all_succeed(generation_stub):
    request = generation_pb2.GenerateRequest(prompt="def f(x):", max_new_tokens=8)
    first = generation_stub.Generate(request, timeout=60)
    time.sleep(100)  # the orchestrator's channels ping at 30, 60 and 90 s: grpc's default policy closed at the third
    after = [generation_stub.Generate(request, timeout=60) for _ in range(3)]
    assert [r.token_ids for r in after] == [first.token_ids] * 3
