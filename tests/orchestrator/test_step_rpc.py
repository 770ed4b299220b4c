"""The orchestrator's clients over real gRPC on loopback, with the per-step calls on one open stream or unary: the
same results and the same errors, and a call that times out or is cancelled leaves the client usable."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from cast.v1 import draft_pb2, verify_pb2
from cast_core.tree import TokenTree
from draft_service import server as draft_server
from draft_service.config import DraftConfig
from orchestrator.clients import DraftClient, DraftItem, VerifyClient, VerifyItem
from verify_service import server as verify_server
from verify_service.config import VerifyConfig

BUDGET = draft_pb2.ExpandBudget(top_k=4, max_depth=3, max_breadth=2)
GREEDY = verify_pb2.SamplingParams()
PROMPTS = {"x": [5, 17, 99, 3, 200], "y": [42, 7, 8, 300, 11, 12]}


async def start_services(tiny_pair, model_thread: str = "worker"):
    """(draft, verify): both services in this process, on free ports, the verifier's model calls on `model_thread`."""
    target, draft_dir = tiny_pair
    draft = await draft_server.start(DraftConfig(model=draft_dir, host="127.0.0.1", port=0, provider="cpu",
                                                 profile=False))
    verify = await verify_server.start(VerifyConfig(model=target, host="127.0.0.1", port=0, dtype="float64",
                                                    device="cpu", max_context=256, profile=False,
                                                    model_thread=model_thread))
    return draft, verify


async def stop_services(draft, verify) -> None:
    await draft.server.stop(None)
    draft.servicer.close()
    await verify.server.stop(None)


@pytest.fixture
async def services(tiny_pair, onnx_cache_dir):
    """(draft, verify) with their worker executors reachable."""
    draft, verify = await start_services(tiny_pair)
    yield draft, verify
    await stop_services(draft, verify)


def clients(services, step_rpc: str) -> tuple[DraftClient, VerifyClient]:
    draft, verify = services
    return DraftClient(f"127.0.0.1:{draft.port}", step_rpc), VerifyClient(f"127.0.0.1:{verify.port}", step_rpc)


def tree_fields(tree: TokenTree) -> tuple:
    return tree.tokens.tolist(), tree.parents.tolist(), tree.depths.tolist(), tree.values.tolist()


async def decode(draft: DraftClient, verify: VerifyClient, sequence_id: str, prompt: list[int], steps: int) -> list:
    """Draft and verify `steps` steps as the step loop does; everything each step returned."""
    await verify.prefill({sequence_id: prompt}, timeout=10)
    tokens, draft_seen, out = list(prompt), 0, []
    for _ in range(steps):
        (expanded,), draft_seconds, _ = await draft.expand(
            [DraftItem(sequence_id, tokens[draft_seen:], draft_seen)], BUDGET, timeout=10)
        draft_seen = len(tokens)
        (committed,), verify_seconds, _ = await verify.verify([VerifyItem(sequence_id, expanded.tree, GREEDY)], timeout=10)
        assert draft_seconds > 0 and verify_seconds > 0
        out.append((tree_fields(expanded.tree), expanded.candidates_per_layer, expanded.kept_per_layer, committed))
        tokens += committed
    return out


async def test_stream_and_unary_give_the_same_results(services):
    results = {}
    for mode in ("unary", "stream"):
        draft, verify = clients(services, mode)
        results[mode] = [await decode(draft, verify, f"{name}-{mode}", prompt, steps=4) for name, prompt in PROMPTS.items()]
        assert (draft.stream is None and verify.stream is None) == (mode == "unary")
        if mode == "stream":  # the calls really went on the streams
            assert draft.stream.call is not None and verify.stream.call is not None
        await draft.close()
        await verify.close()
    assert results["stream"] == results["unary"]


async def failure(awaitable) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value.code(), info.value.details()


async def test_a_bad_request_on_the_stream_fails_as_unary_and_the_stream_goes_on(services):
    errors = {}
    for mode in ("unary", "stream"):
        draft, verify = clients(services, mode)
        await verify.prefill({f"s-{mode}": PROMPTS["x"]}, timeout=10)
        bad_budget = draft_pb2.ExpandBudget(top_k=0, max_depth=2, max_breadth=2)
        bad_root = TokenTree.root_only(PROMPTS["x"][-2])
        errors[mode] = [
            await failure(draft.expand([DraftItem("d", PROMPTS["x"], 0)], bad_budget, timeout=10)),
            await failure(verify.verify([VerifyItem("nobody", TokenTree.root_only(1), GREEDY)], timeout=10)),
            await failure(verify.verify([VerifyItem(f"s-{mode}", bad_root, GREEDY)], timeout=10)),
        ]
        streams = draft.stream and draft.stream.call, verify.stream and verify.stream.call
        # The next requests succeed, on the same streams.
        (expanded,), _, _ = await draft.expand([DraftItem("d", PROMPTS["x"], 0)], BUDGET, timeout=10)
        assert expanded.tree.tokens[0] == PROMPTS["x"][-1]
        (committed,), _, _ = await verify.verify([VerifyItem(f"s-{mode}", expanded.tree, GREEDY)], timeout=10)
        assert committed
        assert (draft.stream and draft.stream.call, verify.stream and verify.stream.call) == streams
        await draft.release(["d"])
        await draft.close()
        await verify.close()
    assert [code for code, _ in errors["unary"]] == [
        grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION]
    assert errors["stream"] == [(code, details.replace("s-unary", "s-stream")) for code, details in errors["unary"]]
    assert errors["stream"][0][1].startswith("budget.top_k:")


async def test_a_timed_out_or_cancelled_call_leaves_the_client_usable(services):
    draft_service, verify_service = services
    draft, verify = clients(services, "unary")
    expected = {name: await decode(draft, verify, f"ref-{name}", prompt, steps=1) for name, prompt in PROMPTS.items()}
    draft, verify = clients(services, "stream")

    # Timed out: the answer comes after the deadline, once the draft's worker is free; it must not be read as the
    # answer to the next call, which goes on a fresh stream.
    draft_service.servicer.executor.submit(time.sleep, 0.5)
    code, _ = await failure(draft.expand([DraftItem("x", PROMPTS["x"], 0)], BUDGET, timeout=0.1))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert draft.stream.call is None
    (expanded,), _, _ = await draft.expand([DraftItem("y", PROMPTS["y"], 0)], BUDGET, timeout=10)
    assert tree_fields(expanded.tree) == expected["y"][0][0]

    # Cancelled while the verifier is busy: the same.
    await verify.prefill({"x": PROMPTS["x"], "y": PROMPTS["y"]}, timeout=10)
    verify_service.servicer.executor.submit(time.sleep, 0.5)
    task = asyncio.create_task(verify.verify([VerifyItem("x", TokenTree.root_only(PROMPTS["x"][-1]), GREEDY)], 10))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert verify.stream.call is None
    (committed,), _, _ = await verify.verify([VerifyItem("y", expanded.tree, GREEDY)], timeout=10)
    assert committed == expected["y"][0][3]
    await draft.close()
    await verify.close()


async def test_model_calls_on_the_event_loop_give_the_same_results_and_errors(services, tiny_pair):
    """--model-thread loop: no worker thread, the same steps and the same statuses for bad requests."""
    on_loop = await start_services(tiny_pair, "loop")
    try:
        assert on_loop[1].servicer.executor is None
        results = {}
        for name, running in (("worker", services), ("loop", on_loop)):
            draft, verify = clients(running, "stream")
            results[name] = [await decode(draft, verify, f"{sid}-{name}", prompt, steps=4)
                             for sid, prompt in PROMPTS.items()]
            code, details = await failure(verify.verify([VerifyItem("nobody", TokenTree.root_only(1), GREEDY)], 10))
            assert code == grpc.StatusCode.NOT_FOUND and "nobody" in details
            bad_budget = draft_pb2.ExpandBudget(top_k=0, max_depth=2, max_breadth=2)
            code, details = await failure(draft.expand([DraftItem("d", PROMPTS["x"], 0)], bad_budget, timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("budget.top_k:")
            assert await draft.release([f"{sid}-{name}" for sid in PROMPTS]) == len(PROMPTS)
            await draft.close()
            await verify.close()
        assert results["loop"] == results["worker"]
    finally:
        await stop_services(*on_loop)
