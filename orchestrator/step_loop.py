"""Continuous batching: one step loop per (draft replica, verify replica) pair.

Requests join at the next step boundary (their prefills batched into one call) and leave when they finish or their
client goes away. Each step sends one batched Expand per tree policy present and one batched Verify for everyone;
CAST prices the step at the live batch size. Results reach each request through its own queue, so a slow reader
of a stream never holds up the others.
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

from cast.v1 import draft_pb2, verify_pb2
from cast_core.errors import ResourceExhausted, Unavailable
from cast_core.selection import GainBuffer
from cast_core.tree import TokenTree
from orchestrator.acceptance import AcceptanceScale
from orchestrator.clients import DraftClient, DraftItem, Expanded, VerifyClient, VerifyItem, timed
from orchestrator.costs import CostModel
from orchestrator.decoding import (
    Chunk, FinishReason, GenerationRequest, GenerationStats, StepRecord, StepTiming, TextAssembler,
)
from orchestrator.draft_gate import DraftGate
from orchestrator.policies import TreePolicy, update_gains

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

    def finish(self, reason: FinishReason, taken: list[int]) -> None:
        self.stats.total_seconds = time.perf_counter() - self.started
        self.out.put_nowait(Chunk(None, taken, reason, self.stats, len(self.assembler.token_ids)))
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
        # One turn of the loop: the call's first run writes its request on the step stream (a unary call starts
        # a turn later, so there the jobs run first).
        await asyncio.sleep(0)
        for job in jobs:
            job()
        return await call
    finally:
        if not call.done():  # a job raised, or the step was cancelled: the call ends here too
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)


def draft_catching_up(group) -> bool:
    """Whether the draft must first commit more than one step's tokens for some sequence of the group: a prompt, or
    the tokens of plain steps since the draft's last call. That is a one-time cost of starting to draft, not what a
    drafted step costs (one commits at most max_depth + 1 tokens), so the draft gate does not learn from the step."""
    return any(len(s.tokens) - s.draft_seen > s.policy.max_depth + 1 for s in group)


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
        self.gains: dict[str, GainBuffer] = {}  # per CAST policy, over the whole batch (as in the paper)
        self.gates: dict[str, DraftGate] = {}   # per CAST policy: whether a step drafts at all (draft_gate.py)
        self.acceptance: dict[str, AcceptanceScale] = {}  # per CAST policy: accepted tokens per unit of value
        # per policy: the next step's Expand budget, priced while this step's Verify ran, and the (batch size,
        # table cells) it holds for
        self.prepared: dict[str, tuple[tuple, draft_pb2.ExpandBudget]] = {}
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
        for s in batch:
            if len(s.tokens) >= self.max_context:  # no room for another tree
                s.finish(FinishReason.CONTEXT, [])
        batch = [s for s in batch if not s.done]
        if not batch:
            return
        started = time.perf_counter()
        timing = StepTiming(shared=self.prefilling is not None)
        size = len(batch)
        context = max(len(s.tokens) for s in batch)
        trees: dict[str, TokenTree] = {s.sequence_id: TokenTree.root_only(s.tokens[-1]) for s in batch}
        expanded_sizes: dict[str, int] = {s.sequence_id: 1 for s in batch}

        groups: dict[str, list[LiveSequence]] = defaultdict(list)
        for s in batch:
            if s.policy.uses_draft:
                groups[s.policy.name].append(s)
        drafted: dict[str, bool] = {}
        catching_up: dict[str, bool] = {}  # per group: its draft first commits more than one step can
        while_verifying: list[Callable[[], object]] = []
        for name, group in groups.items():
            gate = self.gates.setdefault(name, DraftGate()) if group[0].policy.cast is not None else None
            if gate is not None:
                gate.expect_plain(size, self.costs.verify_step_ms(size, context, 1))
            drafted[name] = gate is None or gate.should_draft(size)
            if not drafted[name]:
                self.prepared.pop(name, None)  # it would be stale by the time this group drafts again
                continue  # root-only trees: a plain decoding step for this group
            catching_up[name] = draft_catching_up(group)
            selected = await self._draft_and_select(group, size, context, timing)
            if selected is None:
                return
            chosen, learn = selected
            while_verifying.append(learn)
            for s, (tree, expanded_size) in zip(group, chosen):
                trees[s.sequence_id], expanded_sizes[s.sequence_id] = tree, expanded_size
        if self.prefilling is not None:
            # The verifier runs the prefill before this step's Verify anyway: the newcomers join it, with root-only
            # trees (a plain step gives their first token), and draft from the next step on.
            for s in await self._join():
                if not s.done and len(s.tokens) < self.max_context:
                    trees[s.sequence_id], expanded_sizes[s.sequence_id] = TokenTree.root_only(s.tokens[-1]), 1
                    batch.append(s)
        # The next step's budgets, for the least context it can have: it uses them where the tables' cells agree.
        while_verifying.append(lambda: self._prepare_budgets([g[0].policy for n, g in groups.items() if drafted[n]],
                                                             size, context + 1))

        items = [VerifyItem(s.sequence_id, self._fit(trees[s.sequence_id], s), s.sampling) for s in batch]
        try:
            (results, model_seconds, cold), seconds = await call_while(
                self.verify.verify(items, self.rpc_timeout_s), *while_verifying)
        except grpc.aio.AioRpcError as exc:
            for s in batch:
                s.fail(exc)
            return
        if not cold and not timing.shared:  # a graph capture or a newcomer's prefill is not what a step costs
            self.costs.observe_verify(size, context, max(len(i.tree) for i in items), seconds)
        timing.verify_rpc, timing.verify_model = seconds, model_seconds
        for s, item, committed in zip(batch, items, results):
            s.stats.verify_seconds += seconds
            s.tokens.extend(committed)
            taken, reason = s.assembler.add(committed)
            # The step's accepted tokens are those the request emits: none past max_new_tokens, a stop or EOS.
            s.stats.steps.append(StepRecord(expanded_sizes[s.sequence_id], len(item.tree), item.tree.max_depth,
                                            len(taken), timing))
            if reason is not None:
                s.finish(reason, taken)
            elif not s.done:
                s.out.put_nowait(Chunk(None, taken, completion_tokens=len(s.assembler.token_ids)))
        timing.step = time.perf_counter() - started  # the records above share this object
        committed = {s.sequence_id: len(tokens) for s, tokens in zip(batch, results)}
        verified = {i.sequence_id: i.tree for i in items}
        for name, group in groups.items():
            if name in self.acceptance and drafted[name]:
                self.acceptance[name].observe(sum(float(verified[s.sequence_id].values[1:].sum()) for s in group),
                                              sum(committed[s.sequence_id] - 1 for s in group))
            # Steps with a one-time cost (a graph capture, a draft catching up) would misjudge their kind.
            if (name in self.gates and not cold and not timing.draft_cold and not timing.shared
                    and not catching_up.get(name, False)):
                tokens = sum(committed[s.sequence_id] for s in group) / len(group)
                self._teach_gate(name, size, drafted[name], tokens, timing.step * 1e3)

    def _teach_gate(self, policy: str, size: int, drafted: bool, tokens_per_sequence: float, step_ms: float) -> None:
        """Tell the policy's draft gate what this step gave; log when drafting starts or stops paying."""
        gate = self.gates[policy]
        was = gate.winner_drafts(size)
        gate.observe(size, drafted, tokens_per_sequence, step_ms)
        if gate.winner_drafts(size) != was:
            log.info("%s at batch %d: %s now (%s)", policy, size, "plain decoding" if was else "drafting",
                     gate.describe(size))

    def _gains(self, policy: TreePolicy) -> GainBuffer:
        return self.gains.setdefault(policy.name, GainBuffer.full_of_ones(policy.cast.gain_buffer_size if policy.cast else 1))

    def _value_scale(self, policy: TreePolicy) -> float:
        return self.acceptance.setdefault(policy.name, AcceptanceScale()).scale if policy.cast else 1.0

    def _priced_budget(self, policy: TreePolicy, size: int, context: int) -> draft_pb2.ExpandBudget:
        return policy.budget(policy.max_depth, self.costs, size, context, self._gains(policy), self._value_scale(policy))

    def _budget(self, policy: TreePolicy, size: int, context: int) -> draft_pb2.ExpandBudget:
        """The policy's Expand budget at this batch size and context: the one prepared during the last Verify where
        it prices the same table cells (its online corrections and acceptance scale are one step older)."""
        key, budget = self.prepared.pop(policy.name, (None, None))
        if key == (size, self.costs.price_cells(size, context)):
            return budget
        return self._priced_budget(policy, size, context)

    def _prepare_budgets(self, policies: list[TreePolicy], size: int, context: int) -> None:
        for policy in policies:
            self.prepared[policy.name] = ((size, self.costs.price_cells(size, context)),
                                          self._priced_budget(policy, size, context))

    async def _draft_and_select(self, group: list[LiveSequence], size: int, context: int, timing: StepTiming):
        """One batched Expand for sequences of one policy, then the policy's choice of nodes to verify.

        Returns [(tree to verify, expanded size)] per sequence and what the Expand teaches (a job for the Verify's
        wait), or None when the draft failed the whole group.
        """
        policy = group[0].policy
        budget = self._budget(policy, size, context)
        gains, value_scale = self._gains(policy), self._value_scale(policy)
        items = [DraftItem(s.sequence_id, s.tokens[s.draft_seen:], s.draft_seen) for s in group]
        for s in group:
            s.opened_draft = True
        try:
            (expanded, model_seconds, cold), seconds = await timed(
                self.draft.expand(items, budget, self.rpc_timeout_s))
        except grpc.aio.AioRpcError as exc:
            for s in group:
                s.fail(exc)
            return None
        timing.draft_rpc += seconds
        timing.draft_model += model_seconds
        timing.draft_cold |= cold
        for s in group:
            s.draft_seen = len(s.tokens)
        chosen = policy.select([e.tree for e in expanded], self.costs, size, context, value_scale)

        def learn() -> None:
            if not cold and not timing.shared:
                longest = max(items, key=lambda i: len(i.new_tokens))
                self.costs.observe_draft(size, context, expanded[items.index(longest)].forwards(len(longest.new_tokens)),
                                         seconds, model_seconds)
            for s in group:
                s.stats.draft_seconds += seconds
            if policy.cast is not None:
                self.gains[policy.name] = update_gains(gains, [e.layer_utilities for e in expanded])

        return [(tree, e.expanded_nodes) for tree, e in zip(chosen, expanded)], learn

    def _fit(self, tree: TokenTree, s: LiveSequence) -> TokenTree:
        """Cut the tree's deepest layers where the context has no room for them."""
        room = self.max_context - len(s.tokens) - 1
        if tree.max_depth <= room:
            return tree
        return tree.subtree(np.nonzero(tree.depths <= room)[0])
