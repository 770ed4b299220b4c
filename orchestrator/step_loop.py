"""Continuous batching: one step loop per (draft replica, verify replica) pair.

Requests join at a step boundary (their prompts prefilled in one call while the live batch drafts) and leave when
they finish or their client goes away. A step reads top to bottom: schedule (which policies draft), expand (one
batched Expand per drafting policy), select (the nodes to verify, planner.py), verify (one batched Verify for
everyone), commit, learn. Results reach each request through its own queue, so a slow reader of a stream never
holds up the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from cast.v1 import verify_pb2
from cast_core.errors import ResourceExhausted, Unavailable
from cast_core.tree import TokenTree
from orchestrator.clients import DraftClient, DraftItem, Expanded, VerifyClient, VerifyItem, timed
from orchestrator.costs import CostModel
from orchestrator.decoding import (
    Chunk, FinishReason, GenerationRequest, GenerationStats, StepRecord, StepTiming, TextAssembler,
)
from orchestrator.planner import Planner
from orchestrator.policies import TreePolicy

log = logging.getLogger("cast.orchestrator")


@dataclass
class LiveSequence:
    """A request being decoded. tokens[-1] is the root of its next tree."""

    request: GenerationRequest
    assembler: TextAssembler
    stats: GenerationStats
    tokens: list[int]
    sampling: verify_pb2.SamplingParams
    started: float = field(default_factory=time.perf_counter)
    sequence_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # Chunk, then None; or an exception
    draft_seen: int = 0        # how many of `tokens` the draft has cached
    opened_draft: bool = False
    done: bool = False         # finished, failed or abandoned: leaves at the next boundary

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
    """A step's sequences of one drafting policy, whether they draft this step, and what their Expand returned."""

    planner: Planner
    sequences: list[LiveSequence]
    drafts: bool
    expanded: list[Expanded] = field(default_factory=list)


class StepLoop:
    def __init__(
        self,
        tokenizer,
        draft: DraftClient,
        verify: VerifyClient,
        max_context: int,
        costs: CostModel,
        rpc_timeout_s: float = 60.0,
        max_live: int = 64,
        max_queued: int = 256,
    ) -> None:
        self.tokenizer = tokenizer
        self.draft = draft
        self.verify = verify
        self.max_context = max_context
        self.costs = costs              # this replica pair's tables, corrected online
        self.rpc_timeout_s = rpc_timeout_s
        self.max_live = max_live
        self.max_queued = max_queued
        self.live: list[LiveSequence] = []
        self.waiting: list[LiveSequence] = []
        # Admitted sequences whose prompts the verifier is prefilling while the live batch steps on, and that call.
        self.joining: list[LiveSequence] = []
        self.prefilling: asyncio.Task | None = None
        self.planners: dict[str, Planner] = {}  # per policy: its budgets, selection and learned state
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    # --- the request's side ---------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if len(self.waiting) >= self.max_queued:
            raise ResourceExhausted(
                f"{len(self.live)} sequences live and {len(self.waiting)} queued: the server is full, retry later"
            )
        seq = LiveSequence(
            request=request,
            assembler=TextAssembler(self.tokenizer, request.prompt_ids, request, self.tokenizer.eos_token_id),
            stats=GenerationStats(policy=request.policy.name),
            tokens=list(request.prompt_ids),
            sampling=verify_pb2.SamplingParams(
                temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                seed=request.seed or 0, has_seed=request.seed is not None,
            ),
        )
        self.waiting.append(seq)
        self._ensure_running()
        self._wake.set()
        try:
            while True:
                item = await seq.out.get()
                if isinstance(item, BaseException):
                    raise item
                # Detokenised here, not in the step loop: this runs while the loop waits for its next RPC.
                item.text = seq.assembler.take_text(final=item.finish_reason is not None)
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Cancelled, timed out or finished: the loop releases the sessions at the next boundary.
            seq.done = True
            self._wake.set()

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="step-loop")

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop stepping and release every admitted sequence's sessions on both services; requests still running
        end with UNAVAILABLE. A stopping orchestrator leaves nothing for the services' TTL to clean up."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        admitted = self.live + self.joining
        for s in admitted + self.waiting:
            s.fail(Unavailable("the orchestrator is shutting down"))
        self.live, self.joining, self.waiting = [], [], []
        await self._release(admitted, timeout_s)

    # --- the loop -------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                await self._retire()
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
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug must fail the requests, not hang them
                    log.exception("step failed")
                    for s in self.live + self.joining + self.waiting:
                        s.fail(exc)
        finally:
            if self.prefilling is not None:
                self.prefilling.cancel()

    def _admit(self) -> None:
        """Start prefilling the waiting sequences that fit, in one call, unless a prefill is running. The live batch
        steps on meanwhile: the draft expands its trees while the verifier prefills (a prompt costs a verify
        service several steps' time), and the newcomers join that step's Verify (_step)."""
        if self.prefilling is not None:
            return
        self.waiting = [s for s in self.waiting if not s.done]
        joining = self.waiting[: max(self.max_live - len(self.live), 0)]
        if not joining:
            return
        self.waiting = self.waiting[len(joining):]
        self.joining = joining
        self.prefilling = asyncio.ensure_future(
            timed(self.verify.prefill({s.sequence_id: s.tokens for s in joining}, self.rpc_timeout_s)))

    async def _join(self) -> list[LiveSequence]:
        """Wait for the running prefill; its sequences join the live batch. Returns them."""
        task, joining = self.prefilling, self.joining
        try:
            _, seconds = await task
        except grpc.aio.AioRpcError as exc:
            for s in joining:
                s.fail(exc)
        else:
            for s in joining:
                s.stats.verify_seconds += seconds
        finally:
            self.prefilling, self.joining = None, []
            self.live.extend(joining)  # failed ones too: _retire releases whatever the verifier kept
        return joining

    async def _retire(self) -> None:
        """Drop finished and abandoned sequences and release their sessions on both services."""
        leaving = [s for s in self.live if s.done]
        if not leaving:
            return
        self.live = [s for s in self.live if not s.done]
        await self._release(leaving)

    async def _release(self, sequences: list[LiveSequence], timeout_s: float = 10.0) -> None:
        """Release the sequences' sessions on both services (the draft's only where it opened one)."""
        if not sequences:
            return
        calls = [self.verify.release([s.sequence_id for s in sequences], timeout_s)]
        drafted = [s.sequence_id for s in sequences if s.opened_draft]
        if drafted:
            calls.append(self.draft.release(drafted, timeout_s))
        # A failed release is nobody's error to report: the sessions' TTL frees them.
        await asyncio.gather(*calls, return_exceptions=True)

    async def _step(self, batch: list[LiveSequence]) -> None:
        """One decoding step of the live batch: schedule, expand, select, verify, commit, learn."""
        for s in batch:
            if len(s.tokens) >= self.max_context:  # no room for another tree
                s.finish(FinishReason.CONTEXT, [])
        batch = [s for s in batch if not s.done]
        if not batch:
            return
        started = time.perf_counter()
        timing = StepTiming(one_off=self.prefilling is not None)
        size, context = len(batch), max(len(s.tokens) for s in batch)

        # Schedule: each policy's sequences draft this step, or verify their roots alone (plain decoding).
        groups = self._groups(batch, size, context)
        drafts = {s.sequence_id: Draft.root_only(s) for s in batch}

        # Expand and select, one batched Expand per drafting policy; what it teaches waits for the Verify's wait.
        learn_while_verifying: list[Callable[[], object]] = []
        for group in groups:
            if not group.drafts:
                continue
            learn = await self._expand(group, size, context, timing)
            if learn is None:
                return
            learn_while_verifying.append(learn)
            trees = group.planner.select([e.tree for e in group.expanded], self.costs, size, context)
            for s, tree, e in zip(group.sequences, trees, group.expanded):
                drafts[s.sequence_id] = Draft(tree, e.expanded_nodes)
        if self.prefilling is not None:
            # The verifier runs the prefill before this step's Verify anyway: the newcomers join it with root-only
            # trees (a plain step gives their first token) and draft from the next step on.
            for s in await self._join():
                if not s.done and len(s.tokens) < self.max_context:
                    drafts[s.sequence_id] = Draft.root_only(s)
                    batch.append(s)
        # The next step's budgets, for the least context it can have: used where the table cells agree.
        learn_while_verifying.append(lambda: [g.planner.prepare_budget(self.costs, size, context + 1)
                                              for g in groups if g.drafts])

        # Verify: one call for the whole batch.
        items = [VerifyItem(s.sequence_id, self._fit(drafts[s.sequence_id].tree, s), s.sampling) for s in batch]
        try:
            (results, model_seconds, cold), seconds = await call_while(
                self.verify.verify(items, self.rpc_timeout_s), *learn_while_verifying)
        except grpc.aio.AioRpcError as exc:
            for s in batch:
                s.fail(exc)
            return
        timing.one_off |= cold
        timing.verify_rpc, timing.verify_model = seconds, model_seconds

        # Commit: each sequence takes its accepted path and bonus token, and finishes or streams them.
        for s, item, committed in zip(batch, items, results):
            s.stats.verify_seconds += seconds
            s.tokens.extend(committed)
            taken, reason = s.assembler.add(committed)
            # The step's accepted tokens are those the request emits: none past max_new_tokens, a stop or EOS.
            record = StepRecord(drafts[s.sequence_id].expanded_nodes, len(item.tree), item.tree.max_depth,
                                len(taken), timing)
            s.stats.steps.append(record)
            if reason is not None:
                s.finish(reason, taken, record, item.tree)
            elif not s.done:
                s.out.put_nowait(Chunk(None, taken, completion_tokens=len(s.assembler.token_ids), step=record,
                                       tree=item.tree))
        timing.step = time.perf_counter() - started  # the records above share this object

        # Learn: the verifier's step cost, and each policy from its sequences' outcome.
        if not timing.one_off:
            self.costs.observe_verify(size, context, max(len(i.tree) for i in items), seconds)
        committed = {s.sequence_id: len(tokens) for s, tokens in zip(batch, results)}
        verified = {i.sequence_id: i.tree for i in items}
        for group in groups:
            group.planner.learn_step(size, group.drafts, [verified[s.sequence_id] for s in group.sequences],
                                     [committed[s.sequence_id] for s in group.sequences], timing.step * 1e3,
                                     timing.one_off)

    def _groups(self, batch: list[LiveSequence], size: int, context: int) -> list[PolicyGroup]:
        """The batch's drafting policies, each with its sequences and whether it drafts this step."""
        members: dict[str, list[LiveSequence]] = defaultdict(list)
        for s in batch:
            if s.policy.uses_draft:
                members[s.policy.name].append(s)
        groups = []
        for name, sequences in members.items():
            planner = self.planners.get(name)
            if planner is None:
                planner = self.planners[name] = Planner(sequences[0].policy)
            groups.append(PolicyGroup(planner, sequences, planner.drafts(self.costs, size, context)))
        return groups

    async def _expand(self, group: PolicyGroup, size: int, context: int, timing: StepTiming):
        """One batched Expand for a policy's sequences (group.expanded). Returns what it teaches, a job for the
        Verify's wait, or None when the draft failed the group (its sequences fail)."""
        planner = group.planner
        budget = planner.budget(self.costs, size, context)
        items = [DraftItem(s.sequence_id, s.tokens[s.draft_seen:], s.draft_seen) for s in group.sequences]
        timing.one_off |= draft_catching_up(group.sequences)
        for s in group.sequences:
            s.opened_draft = True
        try:
            (expanded, model_seconds, cold), seconds = await timed(self.draft.expand(items, budget, self.rpc_timeout_s))
        except grpc.aio.AioRpcError as exc:
            for s in group.sequences:
                s.fail(exc)
            return None
        group.expanded = expanded
        timing.draft_rpc += seconds
        timing.draft_model += model_seconds
        timing.one_off |= cold
        for s in group.sequences:
            s.draft_seen = len(s.tokens)

        def learn() -> None:
            if not timing.one_off:
                longest = max(items, key=lambda i: len(i.new_tokens))
                self.costs.observe_draft(size, context, expanded[items.index(longest)].forwards(len(longest.new_tokens)),
                                         seconds, model_seconds)
            for s in group.sequences:
                s.stats.draft_seconds += seconds
            planner.learn_layers([e.layer_utilities for e in expanded])

        return learn

    def _fit(self, tree: TokenTree, s: LiveSequence) -> TokenTree:
        """Cut the tree's deepest layers where the context has no room for them."""
        room = self.max_context - len(s.tokens) - 1
        if tree.max_depth <= room:
            return tree
        return tree.subtree(np.nonzero(tree.depths <= room)[0])
