"""The step loop's overlaps: bookkeeping runs while a service works on the step's request, the next step's Expand
budget, priced during the Verify, is used only where it prices the same table cells, and the live batch keeps
drafting while a newcomer's prompt is prefilled."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from transformers import AutoTokenizer

from cast.v1 import verify_pb2, verify_pb2_grpc
from cast_core.cost_table import CostTable
from cast_core.errors import Unavailable
from cast_runtime.identity import vocab_hash
from cast_core.tree import TokenTree
from orchestrator.clients import VerifyClient, VerifyItem
from orchestrator.costs import CostModel
from orchestrator.decoding import GenerationRequest
from orchestrator.draft_gate import DRAFTED, PLAIN
from orchestrator.planner import Planner
from orchestrator.policies import POLICIES
from orchestrator.discovery import parse_target
from orchestrator.fleet import Fleet
from orchestrator.router import Router
from orchestrator.step_loop import LiveSequence, Prepared, call_while, draft_item, predicted_path, take_prepared
from tests.orchestrator.test_step_rpc import start_services, stop_services

GREEDY = verify_pb2.SamplingParams()


class RecordingVerifier(verify_pb2_grpc.VerifyServiceServicer):
    """Answers each Verify on the stream with the root as the only committed token, and signals its arrival."""

    def __init__(self) -> None:
        self.arrived = threading.Event()

    def VerifyStream(self, requests, context):
        for request in requests:
            self.arrived.set()
            results = [verify_pb2.VerifyResult(sequence_id=s.sequence_id, committed_tokens=[s.tree.tokens[0]])
                       for s in request.sequences]
            yield verify_pb2.VerifyStreamResponse(response=verify_pb2.VerifyResponse(results=results, verify_seconds=1e-3))


@pytest.fixture
async def recorded():
    """(verifier, client): a threaded gRPC server, which takes a request in while the client's event loop is held
    by a job, and a client of it on the step stream."""
    verifier = RecordingVerifier()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    verify_pb2_grpc.add_VerifyServiceServicer_to_server(verifier, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = VerifyClient(f"127.0.0.1:{port}")
    yield verifier, client
    await client.close()
    server.stop(None)


async def test_jobs_run_while_the_request_is_with_the_service(recorded):
    verifier, client = recorded
    await client.verify([VerifyItem("warm-up", TokenTree.root_only(1), GREEDY)], timeout=10)  # opens the stream
    verifier.arrived.clear()
    seen = []

    def job() -> None:  # blocks the loop: only a request that is already out can arrive meanwhile
        seen.append(verifier.arrived.wait(timeout=5))

    (committed, seconds, cold), wall = await call_while(
        client.verify([VerifyItem("a", TokenTree.root_only(42), GREEDY)], timeout=10), job)
    assert seen == [True]
    assert committed == [[42]] and seconds == 1e-3 and not cold and wall > 0


async def test_a_failing_job_cancels_the_call_and_the_client_stays_usable(recorded):
    _, client = recorded

    def broken() -> None:
        raise RuntimeError("a bug in the bookkeeping")

    with pytest.raises(RuntimeError, match="bookkeeping"):
        await call_while(client.verify([VerifyItem("a", TokenTree.root_only(5), GREEDY)], timeout=10), broken)
    assert client.stream.call is None  # dropped: its late answer must not be read as the next call's
    (committed, _, _) = await client.verify([VerifyItem("b", TokenTree.root_only(6), GREEDY)], timeout=10)
    assert committed == [[6]]


def table(role: str, lam: float, delta: float, per_context: tuple) -> CostTable:
    """Dearer with each batch size and context bucket (128 / 512 / 2048): contexts 200 and 300 share every cell,
    200 and 600 do not."""
    batches, contexts, counts = (1, 8), (128, 512, 2048), (1, 8, 64)
    growth = np.array([1.0, 3.0])[:, None, None] * np.array(per_context)[None, :, None]
    millis = growth * (delta + lam * np.array(counts, dtype=np.float64))[None, None, :]
    return CostTable("H100", role, "bf16", batches, contexts, counts, millis)


def costs_by_context() -> CostModel:
    return CostModel.from_tables(table("verify", lam=0.05, delta=5.0, per_context=(1.0, 1.5, 3.0)),
                                 table("draft", lam=0.2, delta=1.0, per_context=(1.0, 1.1, 1.2)))


def test_a_prepared_budget_is_used_where_the_cells_agree_and_only_once():
    costs, planner = costs_by_context(), Planner(POLICIES["cast"])
    planner.prepare_budget(costs, 1, 200)
    prepared = planner.prepared[id(costs)][1]
    costs.observe_verify(1, 200, 30, 0.030)  # this step's verify: the prepared budget does not have it yet
    assert planner.budget(costs, 1, 300) is prepared
    assert not planner.prepared
    fresh = planner.budget(costs, 1, 300)  # nothing prepared any more: priced now, with the new correction
    assert fresh is not prepared
    assert fresh.cast.normalized_cost != prepared.cast.normalized_cost


def test_a_prepared_budget_is_not_used_in_other_cells_or_at_another_batch_size():
    costs, planner = costs_by_context(), Planner(POLICIES["cast"])
    expected = planner.budget(costs, 1, 600)
    for size, context in ((1, 600), (8, 200)):
        planner.prepare_budget(costs, 1, 200)
        budget = planner.budget(costs, size, context)
        want = planner.budget(costs, size, context)  # nothing prepared: the fresh price
        assert np.allclose(budget.cast.normalized_cost, want.cast.normalized_cost)
        assert budget.cast.step_base_cost == want.cast.step_base_cost
    assert expected.cast.normalized_cost == planner.budget(costs, 1, 600).cast.normalized_cost
    # ... and the cells do price differently there, so using the prepared one would have been wrong.
    planner.prepare_budget(costs, 1, 200)
    assert planner.prepared[id(costs)][1].cast.normalized_cost != expected.cast.normalized_cost


async def router_for(draft, verify, tokenizer) -> Router:
    """A router over one draft and one verify service (in this process)."""
    fleet = Fleet(parse_target(f"127.0.0.1:{draft.port}"), parse_target(f"127.0.0.1:{verify.port}"),
                  vocab_hash(tokenizer.get_vocab()))
    await fleet.start(timeout_s=30)
    return Router(fleet, tokenizer, max_context=256)


async def close(router: Router) -> None:
    await router.close()
    await router.fleet.close()


async def run_request(router: Router, prompt_ids: list[int], n: int, started: asyncio.Event | None = None):
    """The request's tokens and its steps."""
    request = GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=n, policy=POLICIES["eagle2"], ignore_eos=True)
    tokens: list[int] = []
    async for chunk in router.generate(request):
        tokens += chunk.token_ids
        if started is not None:
            started.set()
    return tokens, chunk.stats.steps


async def test_the_live_batch_keeps_drafting_while_a_newcomer_prefills(tiny_pair, onnx_cache_dir):
    draft, verify = await start_services(tiny_pair)
    loop = await router_for(draft, verify, AutoTokenizer.from_pretrained(tiny_pair[0]))
    verify_client = loop.fleet.serving("verify")[0].client
    first, second = [5, 17, 99, 3, 200], [42, 7, 8, 300, 11, 12]
    try:
        alone = [await run_request(loop, first, 24), await run_request(loop, second, 8)]

        # From now on a prefill takes 0.5 s more on the verifier's worker. Record when the orchestrator asks for one,
        # when it ends, and when the draft expands.
        asked, prefilled, expands = [], [], []
        prefill, ask, expand = verify.servicer.verifier.prefill, verify_client.prefill, draft.servicer.expander.expand

        def slow_prefill(items):
            time.sleep(0.5)
            result = prefill(items)
            prefilled.append(time.perf_counter())
            return result

        async def asking(*args):
            asked.append(time.perf_counter())
            return await ask(*args)

        def timed_expand(*args):
            expands.append(time.perf_counter())
            return expand(*args)

        started = asyncio.Event()
        running = asyncio.create_task(run_request(loop, first, 24, started))
        await started.wait()  # the first request is live
        verify.servicer.verifier.prefill = slow_prefill
        verify_client.prefill = asking
        draft.servicer.expander.expand = timed_expand
        together = [await run_request(loop, second, 8), await running]
    finally:
        await close(loop)
        await stop_services(draft, verify)
    assert [tokens for tokens, _ in together] == [alone[1][0], alone[0][0]]  # the same tokens, joined mid-way or not
    # The newcomer's first token came from the step it joined, a plain one (its draft starts at the next step).
    newcomer_steps = together[0][1]
    assert (newcomer_steps[0].expanded_nodes, newcomer_steps[0].verified_nodes) == (1, 1)
    assert newcomer_steps[1].expanded_nodes > 1
    (admitted,), (prefill_end,) = asked, prefilled  # the second request's
    # Between the newcomer's admission and the end of its prefill, the live request drafted its next tree (its
    # Verify then waits for the verifier's worker).
    assert any(admitted < t < prefill_end for t in expands), "the live request waited for the prefill"


async def test_closing_the_router_releases_every_session_and_ends_the_requests(tiny_pair, onnx_cache_dir):
    draft, verify = await start_services(tiny_pair)
    loop = await router_for(draft, verify, AutoTokenizer.from_pretrained(tiny_pair[0]))
    started = asyncio.Event()
    try:
        running = asyncio.create_task(run_request(loop, [5, 17, 99, 3, 200], 200, started))
        await started.wait()  # live, with sessions on both services
        assert (len(draft.servicer.expander.sessions), len(verify.servicer.verifier.sessions)) == (1, 1)
        await loop.close()
        with pytest.raises(Unavailable, match="shutting down"):
            await running
        assert (len(draft.servicer.expander.sessions), len(verify.servicer.verifier.sessions)) == (0, 0)
    finally:
        await close(loop)
        await stop_services(draft, verify)


async def test_closing_the_router_while_it_releases_a_finished_sequence_still_releases_it(tiny_pair, onnx_cache_dir):
    draft, verify = await start_services(tiny_pair)
    loop = await router_for(draft, verify, AutoTokenizer.from_pretrained(tiny_pair[0]))
    verify_client = loop.fleet.serving("verify")[0].client
    release, releasing = verify_client.release, asyncio.Event()

    async def slow_release(*args):  # the orchestrator's side: the call has not gone out when the loop is cancelled
        releasing.set()
        await asyncio.sleep(0.5)
        return await release(*args)

    try:
        verify_client.release = slow_release
        await run_request(loop, [5, 17, 99, 3, 200], 4)  # done: the loop releases its sessions, slowly
        await asyncio.wait_for(releasing.wait(), 10)
        await loop.close()  # cancels the loop mid-release
        assert len(verify.servicer.verifier.sessions) == 0
    finally:
        await close(loop)
        await stop_services(draft, verify)


# Pipelined steps: the guess the draft's tree makes, and what a miss leaves the draft to catch up on.


def test_the_predicted_path_follows_the_best_child_to_a_leaf():
    #        0 (root)
    #     1 (.6)    2 (.3)
    #  3 (.2) 4 (.5)   5 (.25)
    #          6 (.4)
    tree = TokenTree.from_lists([10, 11, 12, 13, 14, 15, 16], [-1, 0, 0, 1, 1, 2, 4], [0, 1, 1, 2, 2, 2, 3],
                                [1.0, 0.6, 0.3, 0.2, 0.5, 0.25, 0.4])
    assert predicted_path(tree) == [11, 14, 16]
    assert predicted_path(TokenTree.root_only(10)) == []


async def test_a_guess_is_a_hit_only_when_path_and_bonus_come_true():
    """A hit's draft holds exactly the committed tokens; a miss's draft rewinds to where they part from the guess,
    and at least the root goes again (an Expand's new tokens are never empty)."""
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    tree = TokenTree.root_only(7)

    def sequence(committed: list[int], path: list[int], bonus: int) -> LiveSequence:
        s = LiveSequence(GenerationRequest([1, 2, 3], 8, POLICIES["chain"]), None, None, [1, 2, 3], GREEDY)
        s.draft_seen = 3
        s.prepared = Prepared(3, path, done, tree, 5, bonus)
        s.tokens += committed
        return s

    hit = sequence([4, 5, 6], [4, 5], 6)
    wrong_bonus = sequence([4, 5, 9], [4, 5], 6)
    early = sequence([4, 8], [4, 5], 6)
    none_accepted = sequence([8], [4, 5], 6)
    failed = sequence([4, 5, 6], [4, 5], 6)
    failed.prepared.tree = None
    hits, outcomes = await take_prepared([hit, wrong_bonus, early, none_accepted, failed])
    assert list(hits) == [hit.sequence_id] and hits[hit.sequence_id].tree is tree
    assert [outcomes[s.sequence_id] for s in (hit, wrong_bonus, early, none_accepted, failed)] == \
        ["hit", "miss", "miss", "miss", "none"]
    assert hit.draft_seen == 6
    assert wrong_bonus.draft_seen == 5  # it holds 1 2 3 4 5 6: 4 5 were right, the root 9 goes again
    assert early.draft_seen == 4 and none_accepted.draft_seen == 3
    assert failed.draft_seen == 3
    assert all(s.prepared is None for s in (hit, wrong_bonus, early, none_accepted, failed))


def test_an_expand_after_a_failed_verify_sends_the_root_again():
    """A step's Expand succeeded (the draft cached every token) and its Verify failed (a deadline): no token was
    committed. The next Expand must still send the root, or the draft refuses it (new tokens must not be empty; seen
    in a CI run of tests/integration/test_leaving_clients.py, which also left 2 sessions on the draft)."""
    s = LiveSequence(GenerationRequest([1, 2, 3], 8, POLICIES["chain"]), None, None, [1, 2, 3, 4], GREEDY)
    s.draft_seen = 4
    item = draft_item(s)
    assert item.new_tokens == [4] and item.start_position == 3
    s.draft_seen = 2  # the usual case: what the draft has not cached, the root last
    item = draft_item(s)
    assert item.new_tokens == [3, 4] and item.start_position == 2


async def test_a_sequence_back_on_its_draft_replica_that_ends_before_drafting_there_leaves_no_session(
        tiny_pair, onnx_cache_dir, monkeypatch):
    # The draft refuses one Expand (the sequence leaves its replica; its session there is released in the
    # background) and the release's first call fails (it goes again 0.5 s later). Meanwhile the sequence is back on
    # that replica, the only one, and decodes plainly (a gate's choice) until it ends, never drafting there again.
    draft, verify = await start_services(tiny_pair)
    router = await router_for(draft, verify, AutoTokenizer.from_pretrained(tiny_pair[0]))
    draft_client = router.fleet.serving("draft")[0].client
    verify_client = router.fleet.serving("verify")[0].client
    expand, release, verify_call = draft_client.expand, draft_client.release, verify_client.verify
    refused, calls = asyncio.Event(), {"expand": 0, "release": 0}

    async def refuse_the_third_expand(*args):
        calls["expand"] += 1
        if calls["expand"] == 3:
            refused.set()
            raise grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, details="refused by the test")
        return await expand(*args)

    async def fail_the_first_release(*args):
        calls["release"] += 1
        if calls["release"] == 1:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, details="failed by the test")
        return await release(*args)

    async def slow_verify_after_the_refusal(*args):  # the sequence outlives the release's first retry
        if refused.is_set():
            await asyncio.sleep(0.01)
        return await verify_call(*args)

    drafts = Planner.drafts
    monkeypatch.setattr(Planner, "drafts", lambda self, *a, **k: not refused.is_set() and drafts(self, *a, **k))
    draft_client.expand, draft_client.release = refuse_the_third_expand, fail_the_first_release
    verify_client.verify = slow_verify_after_the_refusal
    try:
        await run_request(router, [5, 17, 99, 3, 200], 160)
        await asyncio.sleep(1.0)  # any release still on its way
        assert calls["expand"] == 3  # as staged: the third refused, none after it
        assert len(draft.servicer.expander.sessions) == 0
        assert calls["release"] == 2  # the failed call and its retry
    finally:
        await close(router)
        await stop_services(draft, verify)


async def test_a_burst_steps_as_one_batch_judged_at_its_size(tiny_pair, onnx_cache_dir):
    # The gate has judged drafting the winner at batch 1 and plain decoding at batch 4. Four `cast` requests come
    # at once to an idle loop: the first is admitted alone, the others while its prompt is prefilled (slowed here).
    # Its first step must wait for them and decode plainly, the batch of 4 its Verify has; judged at batch 1, it
    # drafted, and the draft's reading of its prompt held up everyone's first token.
    draft, verify = await start_services(tiny_pair)
    router = await router_for(draft, verify, AutoTokenizer.from_pretrained(tiny_pair[0]))
    prompts = [[5, 17, 99, 3, 200], [42, 7, 8, 300, 11, 12], [9, 9, 31, 4], [77, 78, 79, 80, 81, 82, 83]]

    async def cast_request(prompt_ids: list[int]):
        request = GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=4, policy=POLICIES["cast"], ignore_eos=True)
        async for chunk in router.generate(request):
            pass
        return chunk.stats.steps

    try:
        await cast_request(prompts[0])  # the loop exists from now on
        (loop,) = router.loops.values()
        gate = loop.planners.get(POLICIES["cast"]).gate
        for _ in range(64):
            gate.record(1, DRAFTED, 4.0, 10.0)
            gate.record(1, PLAIN, 1.0, 10.0)
            gate.record(4, DRAFTED, 1.0, 100.0)
            gate.record(4, PLAIN, 1.0, 10.0)
        prefill = verify.servicer.verifier.prefill

        def slow_prefill(items):
            time.sleep(0.3)
            return prefill(items)

        verify.servicer.verifier.prefill = slow_prefill
        first = asyncio.create_task(cast_request(prompts[0]))
        await asyncio.sleep(0.1)  # the first is being prefilled
        steps = await asyncio.gather(first, *(cast_request(p) for p in prompts[1:]))
    finally:
        await close(router)
        await stop_services(draft, verify)
    first_steps = [s[0] for s in steps]
    assert all(step.timing is first_steps[0].timing for step in first_steps)  # one step gave every first token
    assert [(step.expanded_nodes, step.verified_nodes) for step in first_steps] == [(1, 1)] * 4  # plain, at batch 4
