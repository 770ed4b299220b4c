"""A stack left idle past three keepalive intervals serves its next requests (issue 17: after 90 s or more idle,
the services sent the orchestrator's channels GOAWAY "too_many_pings" and the next requests failed).

The interval is shortened to 3 s here, on a stack of its own, through CAST_GRPC_KEEPALIVE_TIME_MS, which the
orchestrator's channels and the services' servers read alike: 12 s idle is four intervals. Whether the servers admit
the pings is tests/cast_runtime/test_grpc_options.py's check (with its control): this stack also serves after an
idle spell without it, as the orchestrator now reopens its step streams (both this test and its 100 s version on
the real interval passed with the servers' ping options removed, 2026-12-07)."""

from __future__ import annotations

import time

import grpc
import pytest

from cast.v1 import generation_pb2, generation_pb2_grpc
from tests.integration.stacks import start_stack

KEEPALIVE_S = 3


@pytest.fixture(scope="module")
def stub(tiny_pair, onnx_cache_dir, tmp_path_factory):
    target, draft = tiny_pair
    stack = start_stack(target, draft, tmp_path_factory.mktemp("logs-idle"), draft_levels=("lookup",),
                        env={"CAST_GRPC_KEEPALIVE_TIME_MS": str(KEEPALIVE_S * 1000)})
    try:
        with grpc.insecure_channel(stack.spec.address) as channel:
            yield generation_pb2_grpc.GenerationServiceStub(channel)
    finally:
        stack.stop()


def test_requests_after_four_keepalive_intervals_idle_all_succeed(stub):
    request = generation_pb2.GenerateRequest(prompt="def f(x):", max_new_tokens=8)
    first = stub.Generate(request, timeout=60)
    time.sleep(4 * KEEPALIVE_S)  # the orchestrator's channels ping every 3 s meanwhile
    after = [stub.Generate(request, timeout=60) for _ in range(3)]
    assert [r.token_ids for r in after] == [first.token_ids] * 3
