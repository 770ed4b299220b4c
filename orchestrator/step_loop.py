"""Continuous batching on one verify replica: every sequence pinned to it steps together, one Verify a step.

Requests join at a step boundary (their prompts prefilled in one call while the live batch drafts) and leave when
they finish or their client goes away. A step reads top to bottom: schedule (which policies draft), expand (one
batched Expand per drafting policy and draft replica, all in parallel), select (the nodes to verify, planner.py),
verify, commit, learn. Results reach each request through its own queue (router.py), so a slow reader of a stream
never holds up the others.

Pipelined steps (router.pipeline): once a step's Verify is on its way, the draft prepares the next step's tree from
the outcome it predicts: the path it expects the verifier to accept (from the root, the child of highest value at
each node of the verified tree) and the bonus token after it (the draft's own top-1, which it commits as the new
tree's root: a prepared Expand). When the Verify answers, a sequence whose committed tokens are exactly that path and
bonus (a hit) verifies the prepared tree at the next step with no Expand before it; any other (a miss) rewinds the
draft to where the real tokens part from the guess and expands as usual. Verification is unchanged: so is the output.

When the verify replica fails, or drains while another serves, its sequences go back to the router, which replays
them elsewhere (prompt + committed tokens prefilled again); when a draft replica fails, its sequences verify their
roots alone this step (plain decoding) and draft on another replica from the next.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import numpy as np
from opentelemetry import trace

from cast.v1 import verify_pb2
from cast_core.errors import Unavailable
from cast_core.tree import TokenTree
from orchestrator.clients import DraftItem, Expanded, VerifyItem, timed
from orchestrator.costs import CostModel, ReplicaCosts
from orchestrator.decoding import Chunk, FinishReason, GenerationRequest, GenerationStats, StepRecord, StepTiming, TextAssembler
from orchestrator.fleet import Replica, State
from orchestrator.cascade import CascadePlanner, make_planner
from orchestrator.planner import Planner, Planners
from orchestrator.policies import TreePolicy
from orchestrator.telemetry import RequestTrace, StepTrace, policy_label

if TYPE_CHECKING:
    from orchestrator.router import Router

log = logging.getLogger("cast.orchestrator")

# Statuses that say the request itself is wrong: the same call would fail on any replica. Any other failure of a
# call is the replica's (down, restarted, overloaded, timed out): the sequence moves on.
REQUEST_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}
MAX_REPLAYS = 4  # a sequence whose every replica fails it this often fails (a bug is not retried forever)


def replica_failure(error: grpc.aio.AioRpcError) -> bool:
    return error.code() not in REQUEST_ERRORS


@dataclass(eq=False)
class LiveSequence:
    """A request being decoded. tokens[-1] is the root of its next tree."""

    request: GenerationRequest
    assembler: TextAssembler
    stats: GenerationStats
    tokens: list[int]
    sampling: verify_pb2.SamplingParams
    started: float = field(default_factory=time.perf_counter)
    sequence_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # its session on the draft replica
    verify_id: str = ""           # its session on the verify replica: a new one for each replay
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # Chunk, then None; or an exception
    draft: Replica | None = None  # its draft replica; None: none serves, plain steps until one does
    draft_seen: int = 0           # how many of `tokens` the draft replica has cached (it may hold more: a guess)
    prepared: Prepared | None = None  # the next step's tree, drafted during this step's Verify (pipelined steps)
    opened_draft: bool = False    # the draft replica holds a session for it
    done: bool = False            # finished, failed or abandoned: leaves at the next boundary
    admitted: bool = False        # a Prefill was sent for it to its verify replica
    loop: StepLoop | None = None  # the step loop of its verify replica; None: waiting for one (router.py)
    lost_since: float = 0.0       # ... since (loop clock)
    trace: RequestTrace = field(default_factory=lambda: RequestTrace(trace.NoOpTracer(), trace.INVALID_SPAN))

    def __post_init__(self) -> None:
        self.verify_id = self.verify_id or self.sequence_id

    @property
    def policy(self) -> TreePolicy:
        return self.request.policy

    def finish(self, reason: FinishReason, taken: list[int], step: StepRecord | None = None,
               tree: TokenTree | None = None) -> None:
        self.stats.total_seconds = time.perf_counter() - self.started
        self.out.put_nowait(Chunk(None, taken, reason, self.stats, len(self.assembler.token_ids), step, tree))
        self.done = True

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.out.put_nowait(error)
            self.done = True


async def call_while(rpc: Awaitable, *jobs: Callable[[], object]):
    """(result, wall seconds) of one RPC, as timed(), with `jobs` run while the service works on it: bookkeeping
    that the step's next RPC need not wait for. Cancels the RPC if a job raises or the step is cancelled."""
    call = asyncio.ensure_future(timed(rpc))
    try:
        await asyncio.sleep(0)  # one turn of the loop: the call writes its request on the step stream
        for job in jobs:
            job()
        return await call
    finally:
        if not call.done():  # a job raised, or the step was cancelled: the call ends here too
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)


def draft_catching_up(sequences: list[LiveSequence]) -> bool:
    """Whether the draft must first commit more than one step's tokens for some sequence: a prompt, or the tokens of
    plain steps since the draft's last call. A one-time cost of starting to draft, not what a drafted step costs
    (one commits at most max_depth + 1 tokens)."""
    return any(len(s.tokens) - s.draft_seen > s.policy.max_depth + 1 for s in sequences)


def draft_item(s: LiveSequence) -> DraftItem:
    """What a sequence's Expand sends: the tokens its draft has not cached, from their position, and at least the
    root (the draft commits them and grows the tree from the last). After a step whose Verify failed (a deadline,
    a replay), the draft has cached every committed token: the root goes again and the draft rewinds to it (sent
    empty, the draft refused the Expand and the sequence left its draft replica)."""
    start = min(s.draft_seen, len(s.tokens) - 1)
    return DraftItem(s.sequence_id, s.tokens[start:], start)


@dataclass
class Prepared:
    """A sequence's tree for the next step, drafted from a predicted outcome while this step's Verify runs."""

    base: int                   # len(tokens) when sent: the draft then holds tokens[:base] + path + [bonus]
    path: list[int]             # the accepted path the draft predicts
    task: asyncio.Future        # the prepared Expand (shared by its batch); sets the fields below when it answers
    tree: TokenTree | None = None  # selected for the verifier
    expanded_nodes: int = 0
    bonus: int = -1             # the predicted bonus token: the tree's root

    @property
    def predicted(self) -> list[int]:
        return [*self.path, self.bonus]


def predicted_path(tree: TokenTree) -> list[int]:
    """The tokens the draft expects the verifier to accept: from the root, its child of highest value (the draft's
    most likely token), while the tree holds one. The bonus token after them is the draft's next top-1."""
    children: dict[int, list[int]] = defaultdict(list)
    for node in range(1, len(tree)):
        children[int(tree.parents[node])].append(node)
    node, path = 0, []
    while children[node]:
        node = max(children[node], key=lambda c: tree.values[c])
        path.append(int(tree.tokens[node]))
    return path


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


async def settle_prepared(sequences: list[LiveSequence]) -> None:
    """Wait for the prepared Expands of these sequences to answer (or fail)."""
    tasks = {s.prepared.task for s in sequences if s.prepared is not None}
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


async def take_prepared(sequences: list[LiveSequence]) -> tuple[dict[str, Prepared], dict[str, str]]:
    """Once the sequences' prepared Expands answered: the hits' prepared trees by sequence id, and each prepared
    sequence's outcome ("hit", "miss"; "none" where its Expand failed). A miss's draft rewinds, at its next Expand,
    to where the committed tokens part from the guess."""
    await settle_prepared(sequences)
    hits: dict[str, Prepared] = {}
    outcomes: dict[str, str] = {}
    for s in sequences:
        p, s.prepared = s.prepared, None
        if p is None:
            continue
        if p.tree is None:  # it failed: the draft holds at least tokens[:base] (its failure path may have said less)
            s.draft_seen = min(s.draft_seen, p.base, len(s.tokens) - 1)
            outcomes[s.sequence_id] = "none"
            continue
        real = s.tokens[p.base:]
        if real == p.predicted:
            s.draft_seen = len(s.tokens)
            hits[s.sequence_id] = p
            outcomes[s.sequence_id] = "hit"
        else:  # (at least the root is sent again: new tokens are never empty)
            s.draft_seen = min(p.base + common_prefix(real, p.predicted), len(s.tokens) - 1)
            outcomes[s.sequence_id] = "miss"
    return hits, outcomes


@dataclass
class VerifyClock:
    """When a step's Verify answered: what a prepared Expand that answers later delays the next step by."""

    answered: float | None = None  # time.perf_counter()

    def delay_ms(self) -> float:
        return 0.0 if self.answered is None else (time.perf_counter() - self.answered) * 1e3


@dataclass
class Draft:
    """What a step verifies for one sequence: its tree and how many nodes the draft expanded for it."""

    tree: TokenTree
    expanded_nodes: int

    @staticmethod
    def root_only(s: LiveSequence) -> Draft:
        return Draft(TokenTree.root_only(s.tokens[-1]), 1)


@dataclass
class PolicyGroup:
    """A step's sequences of one drafting policy, whether they draft this step, and what their Expands returned."""

    planner: Planner
    sequences: list[LiveSequence]
    drafts: bool
    expanded: dict[str, Expanded] = field(default_factory=dict)  # sequence id -> its expansion
    hits: set[str] = field(default_factory=set)  # sequence ids whose prepared tree this step verifies

    def by_draft_replica(self, skip: set[str] = frozenset()) -> dict[Replica, list[LiveSequence]]:
        out: dict[Replica, list[LiveSequence]] = defaultdict(list)
        for s in self.sequences:
            if s.draft is not None and s.sequence_id not in skip:
                out[s.draft].append(s)
        return out


class StepLoop:
    def __init__(self, replica: Replica, router: Router) -> None:
        self.replica = replica          # the verify replica
        self.router = router
        self.live: list[LiveSequence] = []
        self.waiting: list[LiveSequence] = []
        # Admitted sequences whose prompts the verifier is prefilling while the live batch steps on, and that call.
        self.joining: list[LiveSequence] = []
        self.prefilling: asyncio.Task | None = None
        self.prefill_span: trace.Span | None = None  # the running prefill's, where traced
        self.admit_after = 0.0          # the verifier was full: admit again from this time (loop clock)
        self.planners = Planners(make_planner)  # per policy: its budgets, selection and learned state
        self.pairs: dict[str, CostModel] = {}   # per draft replica: prices on this verify replica
        self.no_draft = ReplicaCosts.for_replica("draft", None)
        self.telemetry = router.telemetry
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def max_live(self) -> int:
        """Sequences decoded together at most: the orchestrator's limit, and the replica's slots where it says."""
        return min(self.router.max_live, self.replica.slots or self.router.max_live)

    @property
    def sequences(self) -> list[LiveSequence]:
        return self.live + self.joining + self.waiting

    def costs(self, draft: Replica | None) -> CostModel:
        """The step's prices with this draft replica (its table and corrections, and this verifier's)."""
        key = draft.address if draft is not None else ""
        pair = self.pairs.get(key)
        if pair is None:
            pair = self.pairs[key] = CostModel.pair(self.replica.costs, draft.costs if draft else self.no_draft)
            if draft is not None:
                pair.levels = {name: CostModel.pair(self.replica.costs, c) for name, c in draft.level_costs.items()}
        return pair

    def enqueue(self, s: LiveSequence, front: bool = False) -> None:
        if front:
            self.waiting.insert(0, s)
        else:
            self.waiting.append(s)
        self.wake()

    def wake(self) -> None:
        if self._task is None or self._task.done():
            # In a context of its own: not the trace context of the request that happened to wake it.
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"step-loop {self.replica.address}",
                                                                context=contextvars.Context())
        self._wake.set()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop stepping and release every admitted sequence's sessions on both services; requests still running
        end with UNAVAILABLE. A stopping orchestrator leaves nothing for the services' TTL to clean up."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        admitted = self.live + self.joining
        for s in self.sequences:
            s.fail(Unavailable("the orchestrator is shutting down"))
        self.live, self.joining, self.waiting = [], [], []
        await settle_prepared(admitted)
        await self._release(admitted, timeout_s)

    # --- the loop -------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                await self._retire()
                await self._evacuate()
                if not self.live and not self.waiting and self.prefilling is None:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                try:
                    self._admit()
                    stepping = [s for s in self.live if not s.done]
                    if self.prefilling is not None and not stepping:  # nothing else to do meanwhile
                        await self._join()
                        stepping = [s for s in self.live if not s.done]
                    if stepping:
                        await self._step(stepping)
                    elif self.waiting and self.prefilling is None:  # the verifier is full: wait a little
                        await asyncio.sleep(max(self.admit_after - asyncio.get_running_loop().time(), 0.01))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug must fail the requests, not hang them
                    log.exception("step failed")
                    for s in self.sequences:
                        s.fail(exc)
        finally:
            if self.prefilling is not None:
                self.prefilling.cancel()

    async def _evacuate(self) -> None:
        """Hand this loop's sequences back to the router when its replica is down, or draining while another
        serves: they are replayed there. Sequences in a running prefill move once it ends."""
        state = self.replica.state
        if state is State.SERVING or (state is State.DRAINING and not self.router.fleet.serving("verify")):
            return
        leaving = [s for s in self.live + self.waiting if not s.done]
        if leaving:
            self.live = [s for s in self.live if s.done]
            self.waiting = []
            self.router.replay(leaving, self)

    def _admit(self) -> None:
        """Start prefilling the waiting sequences that fit, in one call, unless a prefill is running. The live batch
        steps on meanwhile: the draft expands its trees while the verifier prefills (a prompt costs a verify
        service several steps' time), and the newcomers join that step's Verify (_step). A replayed sequence
        prefills its prompt and every token it committed."""
        if self.prefilling is not None or asyncio.get_running_loop().time() < self.admit_after:
            return
        self.waiting = [s for s in self.waiting if not s.done]
        joining = self.waiting[: max(self.max_live - len(self.live), 0)]
        if not joining:
            return
        self.waiting = self.waiting[len(joining):]
        self.joining = joining
        span = self.prefill_span = self.telemetry.batch_span("prefill", joining, **{
            "cast.verify.replica": self.replica.address, "cast.prefill.sequences": len(joining),
            "cast.prefill.tokens": sum(len(s.tokens) for s in joining)})
        for s in joining:
            s.admitted = True
            s.trace.enter("prefill", [trace.Link(span.get_span_context())] if span else [])
        with trace.use_span(span) if span else nullcontext():  # the call's metadata carries its context
            self.prefilling = asyncio.ensure_future(timed(
                self.replica.client.prefill({s.verify_id: s.tokens for s in joining}, self.router.rpc_timeout_s)))

    async def _join(self) -> list[LiveSequence]:
        """Wait for the running prefill; its sequences join the live batch. Returns them."""
        task, joining, span = self.prefilling, self.joining, self.prefill_span
        self.prefilling, self.joining, self.prefill_span = None, [], None
        try:
            _, seconds = await task
        except asyncio.CancelledError:
            self.joining = joining  # the loop is closing: close() fails them and releases their sessions
            raise
        except grpc.aio.AioRpcError as exc:
            self.telemetry.failed(span, exc)
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # its slots are taken (another orchestrator's)
                for s in joining:
                    s.trace.enter("queue")
                self.waiting[:0] = joining
                self.admit_after = asyncio.get_running_loop().time() + 0.1
            elif replica_failure(exc):
                self.router.fleet.report_failure(self.replica, exc)
                self.router.replay(joining, self)
            else:
                for s in joining:
                    s.fail(exc)
                self.live.extend(joining)  # _retire releases whatever the verifier kept
            return []
        except Exception:
            self.live.extend(joining)  # the loop fails every sequence it holds (_run), and _retire releases them
            raise
        finally:
            if span is not None:
                span.end()
        for s in joining:
            s.stats.verify_seconds += seconds
            s.trace.joined()
        self.live.extend(joining)
        return joining

    async def _retire(self) -> None:
        """Drop finished and abandoned sequences and release their sessions on both services."""
        leaving = [s for s in self.live + self.waiting if s.done]
        if not leaving:
            return
        await settle_prepared(leaving)  # their prepared Expands answer before the draft releases them
        await self._release([s for s in leaving if s.admitted])
        # Dropped only now: a loop cancelled during the release (the orchestrator closing) leaves them in `live`,
        # where close() releases them (releasing a session twice is harmless; never releasing it holds its slot).
        gone = {id(s) for s in leaving}
        self.live = [s for s in self.live if id(s) not in gone]
        self.waiting = [s for s in self.waiting if id(s) not in gone]
        for s in leaving:
            self.router.forget(s)

    async def _release(self, sequences: list[LiveSequence], timeout_s: float = 10.0) -> None:
        """Release the sequences' sessions on this verifier and on their draft replicas."""
        if not sequences:
            return
        span = self.telemetry.batch_span("release", sequences, **{"cast.release.sequences": len(sequences)})
        with trace.use_span(span, end_on_exit=True) if span else nullcontext():  # the calls carry its context
            calls = [self.router.release(self.replica, [s.verify_id for s in sequences], timeout_s)]
            drafted: dict[Replica, list[str]] = defaultdict(list)
            for s in sequences:
                if s.opened_draft and s.draft is not None:
                    drafted[s.draft].append(s.sequence_id)
            calls += [self.router.release(replica, ids, timeout_s) for replica, ids in drafted.items()]
            # A failed call goes again in the background (Router.release), while the loop steps on.
            await asyncio.gather(*calls, return_exceptions=True)

    # --- one step -------------------------------------------------------------------------------------------

    async def _step(self, batch: list[LiveSequence]) -> None:
        """One decoding step of the live batch: schedule, expand, select, verify, commit, learn. Where one of its
        requests is traced, the step is a span linked to them, and its Expand and Verify messages carry its context."""
        for s in batch:
            if len(s.tokens) >= self.router.max_context:  # no room for another tree
                s.finish(FinishReason.CONTEXT, [])
        batch = [s for s in batch if not s.done]
        if not batch:
            return
        step = self.telemetry.start_step(batch, self.replica)
        with trace.use_span(step.span, end_on_exit=True) if step else nullcontext():
            await self._run_step(batch, step)

    async def _run_step(self, batch: list[LiveSequence], step: StepTrace | None) -> None:
        started = time.perf_counter()
        timing = StepTiming(prefill=self.prefilling is not None)
        size, context = len(batch), max(len(s.tokens) for s in batch)

        # Pipelined: the trees prepared during the last Verify, where the draft's guess came true.
        waited = time.perf_counter()
        hits, outcomes = await take_prepared(batch)
        timing.draft_rpc = time.perf_counter() - waited if outcomes else 0.0

        # Schedule: each policy's sequences draft this step, or verify their roots alone (plain decoding).
        for s in batch:
            self.router.keep_draft_replica(s)
        groups = self._groups(batch, size, context)
        drafts = {s.sequence_id: Draft.root_only(s) for s in batch}
        for g in groups:
            g.hits = {s.sequence_id for s in g.sequences if s.sequence_id in hits} if g.drafts else set()
            for sid in g.hits:
                drafts[sid] = Draft(hits[sid].tree, hits[sid].expanded_nodes)
        for sid in hits.keys() - set().union(*(g.hits for g in groups)):
            outcomes[sid] = "none"  # its policy does not draft this step

        # Expand: one batched Expand per drafting policy and draft replica, all at once (not for hits).
        calls = [self._expand(g, replica, members, size, context, timing, step)
                 for g in groups if g.drafts for replica, members in g.by_draft_replica(g.hits).items()]
        expand_started = time.perf_counter()
        learn_while_verifying = [learn for learn in await asyncio.gather(*calls) if learn is not None]
        if calls:
            timing.draft_rpc += time.perf_counter() - expand_started

        # Select: per policy, one cut for all its sequences (they share the verifier's forward).
        for g in groups:
            drafted = [s for s in g.sequences if s.sequence_id in g.expanded]
            if not drafted:
                continue
            expansions = [g.expanded[s.sequence_id] for s in drafted]
            trees = g.planner.select([e.tree for e in expansions], self.costs(drafted[0].draft), size, context,
                                     timing.draft_rpc * 1e3)
            for s, tree, e in zip(drafted, trees, expansions):
                drafts[s.sequence_id] = Draft(tree, e.expanded_nodes)
        if self.prefilling is not None:
            # The verifier runs the prefill before this step's Verify anyway: the newcomers join it with root-only
            # trees (a plain step gives their first token) and draft from the next step on.
            for s in await self._join():
                if not s.done and len(s.tokens) < self.router.max_context:
                    drafts[s.sequence_id] = Draft.root_only(s)
                    batch.append(s)
        # The next step's budgets, for the least context it can have: used where the table cells agree.
        learn_while_verifying.append(lambda: [
            g.planner.prepare_budget(self.costs(replica), size, context + 1)
            for g in groups if g.drafts for replica in g.by_draft_replica()])

        # Verify: one call for the whole batch.
        items = [VerifyItem(s.verify_id, self._fit(drafts[s.sequence_id].tree, s), s.sampling) for s in batch]
        timing.predicted_verify_ms = self.costs(None).verify_step_ms(size, context, max(len(i.tree) for i in items))
        clock = VerifyClock()
        if self.router.pipeline:  # the next step's trees, drafted while this Verify runs
            verified = {s.sequence_id: item.tree for s, item in zip(batch, items)}
            learn_while_verifying.append(lambda: self._prepare(groups, verified, size, context + 1, clock))
        try:
            (results, model_seconds, cold), seconds = await call_while(
                self.replica.client.verify(items, self.router.rpc_timeout_s), *learn_while_verifying)
        except grpc.aio.AioRpcError as exc:
            self.telemetry.failed(step and step.span, exc)
            if replica_failure(exc):  # the sequences lose nothing: replayed on another replica
                self.router.fleet.report_failure(self.replica, exc)
                self.live = [s for s in self.live if s not in batch]
                self.router.replay(batch, self)
            else:
                for s in batch:
                    s.fail(exc)
            return
        clock.answered = time.perf_counter()
        timing.cold |= cold
        timing.verify_rpc, timing.verify_model = seconds, model_seconds

        # Commit: each sequence takes its accepted path and bonus token, and finishes or streams them.
        kinds = {s.sequence_id: g.planner.step_kind(g.drafts) for g in groups for s in g.sequences}
        for s, item, committed in zip(batch, items, results):
            s.stats.verify_seconds += seconds
            s.tokens.extend(committed)
            taken, reason = s.assembler.add(committed)
            # The step's accepted tokens are those the request emits: none past max_new_tokens, a stop or EOS.
            record = StepRecord(drafts[s.sequence_id].expanded_nodes, len(item.tree), item.tree.max_depth,
                                len(taken), timing, outcomes.get(s.sequence_id, "none"),
                                *kinds.get(s.sequence_id, ("plain", "")))
            s.stats.steps.append(record)
            if reason is not None:
                s.finish(reason, taken, record, item.tree)
            elif not s.done:
                s.out.put_nowait(Chunk(None, taken, completion_tokens=len(s.assembler.token_ids), step=record,
                                       tree=item.tree))
        timing.step = time.perf_counter() - started  # the records above share this object
        self.telemetry.step_done(step, batch, [s.stats.steps[-1] for s in batch], timing)

        # Learn: the verifier's step cost, and each policy from its sequences' outcome.
        if not timing.one_off:
            self.costs(None).observe_verify(size, context, max(len(i.tree) for i in items), seconds)
        tokens = {s.sequence_id: t for s, t in zip(batch, results)}
        committed = {sid: len(t) for sid, t in tokens.items()}
        verified = {s.sequence_id: i.tree for s, i in zip(batch, items)}
        for g in groups:
            if g.planner.learn_step(size, g.drafts, [verified[s.sequence_id] for s in g.sequences],
                                    [committed[s.sequence_id] for s in g.sequences], timing.step * 1e3, timing.one_off,
                                    switch=timing.only_switched):
                self.telemetry.gate_switches.add(1, {"cast.policy": policy_label(g.planner.policy.name),
                                                     "cast.batch_size": size})
            if g.drafts:
                g.planner.learn_ranks([verified[s.sequence_id] for s in g.sequences],
                                      [tokens[s.sequence_id] for s in g.sequences])
            if isinstance(g.planner, CascadePlanner) and g.drafts:
                g.planner.learn_levels([g.expanded.get(s.sequence_id) for s in g.sequences],
                                       [verified[s.sequence_id] for s in g.sequences],
                                       [tokens[s.sequence_id] for s in g.sequences])

    def _groups(self, batch: list[LiveSequence], size: int, context: int) -> list[PolicyGroup]:
        """The batch's drafting policies, each with its sequences and whether it drafts this step (a policy whose
        sequences have no draft replica does not)."""
        members: dict[str, list[LiveSequence]] = defaultdict(list)
        for s in batch:
            if s.policy.uses_draft:
                members[s.policy.name].append(s)
        groups = []
        for name, sequences in members.items():
            planner = self.planners.get(sequences[0].policy)
            with_draft = [s.draft for s in sequences if s.draft is not None]
            drafts = bool(with_draft) and planner.drafts(self.costs(with_draft[0]), size, context,
                                                          [s.tokens for s in sequences])
            groups.append(PolicyGroup(planner, sequences, drafts))
        return groups

    async def _expand(self, group: PolicyGroup, replica: Replica, sequences: list[LiveSequence], size: int,
                      context: int, timing: StepTiming, step: StepTrace | None):
        """One batched Expand on one draft replica for some of a policy's sequences (into group.expanded). Returns
        what it teaches, a job for the Verify's wait; None when the replica failed them: they verify their roots
        alone this step and move to another draft replica."""
        budget = group.planner.budget(self.costs(replica), size, context)
        costs = group.planner.draft_costs(self.costs(replica))
        items = [draft_item(s) for s in sequences]
        timing.switched |= draft_catching_up(sequences)
        for s in sequences:
            s.opened_draft = True
        try:
            (expanded, model_seconds, cold), seconds = await timed(
                replica.client.expand(items, budget, self.router.rpc_timeout_s))
        except grpc.aio.AioRpcError as exc:
            if replica_failure(exc):
                self.router.fleet.report_failure(replica, exc)
            else:  # our bug, or the replica lost the sequence's state: start its draft afresh elsewhere
                log.error("draft replica %s refused an Expand: %s: %s", replica.address, exc.code().name, exc.details())
            if step is not None:
                step.span.add_event("draft replica failed", {"cast.draft.replica": replica.address,
                                                             "rpc.grpc.status_code": exc.code().value[0]})
            for s in sequences:
                self.router.drop_draft_replica(s)
            return None
        for s, e in zip(sequences, expanded):
            group.expanded[s.sequence_id] = e
            s.draft_seen = len(s.tokens)
        timing.draft_model = max(timing.draft_model, model_seconds)
        timing.cold |= cold
        longest = max(range(len(items)), key=lambda i: len(items[i].new_tokens))
        forwards = expanded[longest].forwards(len(items[longest].new_tokens))
        timing.predicted_draft_ms = max(timing.predicted_draft_ms, costs.expand_ms(size, context, forwards))

        def learn() -> None:
            if not timing.one_off:
                costs.observe_draft(size, context, forwards, seconds, model_seconds)
            for s in sequences:
                s.stats.draft_seconds += seconds
            group.planner.learn_layers([e.layer_utilities for e in expanded])

        return learn

    def _prepare(self, groups: list[PolicyGroup], verified: dict[str, TokenTree], size: int, context: int,
                 clock: VerifyClock) -> None:
        """Start the next step's prepared Expands (one per drafting policy and draft replica) for the sequences whose
        tree came from the draft and whose draft holds exactly their committed tokens. Cascade policies are not
        prepared: they step as without --pipeline."""
        for g in groups:
            # A cascade chooses its levels when its step starts, and learns from this step's plan after the Verify.
            if not g.drafts or isinstance(g.planner, CascadePlanner):
                continue
            for replica, members in g.by_draft_replica().items():
                ready = []
                for s in members:
                    if s.done or s.sequence_id not in g.expanded and s.sequence_id not in g.hits:
                        continue
                    if not s.opened_draft or s.draft_seen != len(s.tokens):
                        continue
                    path = predicted_path(verified[s.sequence_id])
                    # Room for the guess and a tree after it; near the context's end, steps are not prepared.
                    if len(s.tokens) + len(path) + 2 + s.policy.max_depth >= self.router.max_context:
                        continue
                    ready.append((s, path))
                if not ready:
                    continue
                task = asyncio.ensure_future(self._prepared_expand(g, replica, ready, size, context, clock))
                for s, path in ready:
                    s.prepared = Prepared(len(s.tokens), path, task)

    async def _prepared_expand(self, group: PolicyGroup, replica: Replica, ready: list[tuple[LiveSequence, list[int]]],
                               size: int, context: int, clock: VerifyClock) -> None:
        """One prepared Expand: each sequence's root again (a new token is never empty), then its predicted path; the
        draft commits them and its own next top-1, the new tree's root. CAST selects the tree right away, pricing the
        draft at what it delays the next step: nothing while the Verify is still running."""
        costs = self.costs(replica)
        budget = group.planner.prepared_budget(costs, size, context)
        items = [DraftItem(s.sequence_id, [s.tokens[-1], *path], len(s.tokens) - 1, predict_root=True)
                 for s, path in ready]
        try:
            (expanded, _, _), seconds = await timed(replica.client.expand(items, budget, self.router.rpc_timeout_s))
        except grpc.aio.AioRpcError as exc:
            if replica_failure(exc):
                self.router.fleet.report_failure(replica, exc)
                for s, _ in ready:
                    self.router.drop_draft_replica(s)
            else:  # what the draft holds is unknown: the next Expand sends every token again
                log.error("draft replica %s refused a prepared Expand: %s: %s", replica.address, exc.code().name,
                          exc.details())
                for s, _ in ready:
                    s.draft_seen = 0
            return
        delay_ms = clock.delay_ms()  # the draft priced at what it delays: only its time past the Verify
        group.planner.learn_exposed(size, seconds * 1e3, delay_ms)
        trees = group.planner.select([e.tree for e in expanded], costs, size, context, delay_ms)
        for (s, _), e, tree in zip(ready, expanded, trees):
            s.stats.draft_seconds += seconds
            if s.prepared is not None:
                s.prepared.tree, s.prepared.expanded_nodes, s.prepared.bonus = tree, e.expanded_nodes, int(e.tree.tokens[0])
        group.planner.learn_layers([e.layer_utilities for e in expanded])

    def _fit(self, tree: TokenTree, s: LiveSequence) -> TokenTree:
        """Cut the tree's deepest layers where the context has no room for them."""
        room = self.router.max_context - len(s.tokens) - 1
        if tree.max_depth <= room:
            return tree
        return tree.subtree(np.nonzero(tree.depths <= room)[0])
