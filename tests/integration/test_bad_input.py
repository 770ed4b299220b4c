"""Bad requests get a clear status naming the field, over real gRPC, and the services keep serving; a cancelled or
timed-out request leaves no session behind on the draft or the verifier."""

from __future__ import annotations

import time

import grpc
import pytest

from cast.v1 import draft_pb2, draft_pb2_grpc, generation_pb2, verify_pb2, verify_pb2_grpc

GOOD = dict(prompt="def add(a, b):", max_new_tokens=8, policy="eagle2")


def call_error(stub, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(generation_pb2.GenerateRequest(**{**GOOD, **fields}), timeout=60)
    return info.value


@pytest.mark.parametrize(
    "fields, code, field_name",
    [
        (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (dict(max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (dict(max_new_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (dict(max_new_tokens=10**6), grpc.StatusCode.OUT_OF_RANGE, "max_new_tokens"),
        (dict(prompt="x = 1\n" * 2000), grpc.StatusCode.OUT_OF_RANGE, "prompt"),
        (dict(policy="beam"), grpc.StatusCode.INVALID_ARGUMENT, "policy"),
        (dict(policy="tree:9x5/16"), grpc.StatusCode.INVALID_ARGUMENT, "policy"),
        (dict(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (dict(stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
        (dict(stop=["x"] * 17), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
        (dict(stop=["x" * 257]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    ],
)
def test_bad_generate_requests(generation_stub, fields, code, field_name):
    error = call_error(generation_stub, **fields)
    assert error.code() == code, error.details()
    assert field_name in error.details()
    # ...and the service keeps serving.
    assert generation_stub.Generate(generation_pb2.GenerateRequest(**GOOD), timeout=60).usage.completion_tokens > 0


def test_stop_string_and_eos_end_the_request(generation_stub):
    full = generation_stub.Generate(generation_pb2.GenerateRequest(**{**GOOD, "max_new_tokens": 30}), timeout=60)
    assert full.text, "the tiny model should produce some text"
    stop = full.text[len(full.text) // 2:][:2] or full.text[:1]
    cut = generation_stub.Generate(generation_pb2.GenerateRequest(**{**GOOD, "max_new_tokens": 30, "stop": [stop]}), timeout=60)
    assert cut.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert stop not in cut.text and full.text.startswith(cut.text)
    assert cut.text == full.text[: full.text.find(stop)]


def live_sequences(stack) -> tuple[int, int]:
    addrs = stack.addresses()
    with grpc.insecure_channel(addrs["draft"]) as d, grpc.insecure_channel(addrs["verify"]) as v:
        draft = draft_pb2_grpc.DraftServiceStub(d).Describe(draft_pb2.DraftDescribeRequest(), timeout=10)
        verify = verify_pb2_grpc.VerifyServiceStub(v).Describe(verify_pb2.VerifyDescribeRequest(), timeout=10)
    return draft.replica.live_sequences, verify.replica.live_sequences


def wait_until_released(stack, timeout_s: float = 10.0) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    while (live := live_sequences(stack)) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    return live


def test_cancelled_stream_releases_both_sessions(tiny_stack, generation_stub):
    request = generation_pb2.GenerateRequest(prompt="import os\n", max_new_tokens=2000, policy="eagle2", ignore_eos=True)
    stream = generation_stub.GenerateStream(request, timeout=120)
    next(stream)
    assert live_sequences(tiny_stack) == (1, 1)
    stream.cancel()
    assert wait_until_released(tiny_stack) == (0, 0)


def test_deadline_stops_the_work_and_releases_sessions(tiny_stack, generation_stub):
    request = generation_pb2.GenerateRequest(prompt="import os\n", max_new_tokens=3000, policy="eagle2", ignore_eos=True)
    with pytest.raises(grpc.RpcError) as info:
        generation_stub.Generate(request, timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until_released(tiny_stack) == (0, 0)
