"""The decoding loop of one request: prefill, then steps of draft-expand, select, verify, commit, until a stop.

A step always commits at least one token (the verifier's bonus token), so speculation can only help; the `ar`
policy verifies the root alone and is plain autoregressive decoding.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum

from cast.v1 import draft_pb2, verify_pb2
from cast_core.tree import TokenTree
from cast_core.selection import GainBuffer
from orchestrator.clients import DraftClient, VerifyClient
from orchestrator.costs import CostModel
from orchestrator.policies import TreePolicy, update_gains


class FinishReason(Enum):
    LENGTH = 1
    EOS = 2
    STOP = 3
    CONTEXT = 4


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    policy: TreePolicy
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    timeout_s: float | None = None  # the client's remaining deadline, passed downstream


@dataclass
class StepRecord:
    expanded_nodes: int
    verified_nodes: int
    depth: int
    accepted_tokens: int


@dataclass
class GenerationStats:
    policy: str
    steps: list[StepRecord] = field(default_factory=list)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def mean_accepted_length(self) -> float:
        return sum(s.accepted_tokens for s in self.steps) / len(self.steps) if self.steps else 0.0


@dataclass
class Chunk:
    """What one step adds to the output; the last chunk has finish_reason and stats set."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None
    completion_tokens: int = 0


class TextAssembler:
    """Incremental detokenisation with stop strings, EOS and the token limit, one committed token at a time."""

    def __init__(self, tokenizer, prompt_ids: list[int], request: GenerationRequest, eos_token_id: int | None) -> None:
        self.tokenizer = tokenizer
        # Decode with a little prompt context so that tokenizers that drop a leading space stay exact.
        self.context_ids = prompt_ids[-4:]
        self.context_text = tokenizer.decode(self.context_ids, skip_special_tokens=True)
        self.request = request
        self.eos = None if request.ignore_eos else eos_token_id
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.holdback = max((len(s) for s in request.stop), default=1) - 1

    def _decode(self) -> str:
        full = self.tokenizer.decode(self.context_ids + self.token_ids, skip_special_tokens=True)
        return full[len(self.context_text):]

    def add(self, tokens: list[int]) -> tuple[list[int], FinishReason | None]:
        """Append committed tokens until one finishes the request; return those taken and the reason."""
        taken: list[int] = []
        reason = None
        for token in tokens:
            self.token_ids.append(token)
            taken.append(token)
            if self.request.stop:
                self.text = self._decode()
                cut = min((i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.request.stop) if i >= 0), default=-1)
                if cut >= 0:
                    self.text = self.text[:cut]
                    reason = FinishReason.STOP
                    break
            if token == self.eos:
                reason = FinishReason.EOS
                break
            if len(self.token_ids) >= self.request.max_new_tokens:
                reason = FinishReason.LENGTH
                break
        if not self.request.stop:
            self.text = self._decode()
        return taken, reason

    def take_text(self, final: bool) -> str:
        """New text since the last call; holds back what could still become a stop string or a split character."""
        end = len(self.text)
        if not final:
            end -= self.holdback
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out


class Generator:
    """Runs requests against one draft replica and one verify replica."""

    def __init__(
        self, tokenizer, draft: DraftClient, verify: VerifyClient, max_context: int, rpc_timeout_s: float, costs: CostModel
    ) -> None:
        self.tokenizer = tokenizer
        self.draft = draft
        self.verify = verify
        self.max_context = max_context
        self.rpc_timeout_s = rpc_timeout_s
        self.eos_token_id = tokenizer.eos_token_id
        self.costs = costs  # shared by every request on this replica pair, corrected online
        self.live = 0       # requests in flight: the batch size that prices a step

    def _timeout(self, request: GenerationRequest, started: float) -> float:
        if request.timeout_s is None:
            return self.rpc_timeout_s
        return max(request.timeout_s - (time.perf_counter() - started), 0.001)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        started = time.perf_counter()
        sequence_id = uuid.uuid4().hex
        policy = request.policy
        stats = GenerationStats(policy=policy.name)
        assembler = TextAssembler(self.tokenizer, request.prompt_ids, request, self.eos_token_id)
        sampling = verify_pb2.SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed or 0,
            has_seed=request.seed is not None,  # the servicer always sets one for sampling
        )
        tokens = list(request.prompt_ids)   # committed so far; tokens[-1] is the next tree's root
        draft_seen = 0                      # how many of `tokens` the draft has in its cache
        opened_draft = False
        gains = GainBuffer.full_of_ones(policy.cast.gain_buffer_size) if policy.cast else GainBuffer.full_of_ones(1)
        self.live += 1
        try:
            timed = await self.verify.prefill(sequence_id, tokens, self._timeout(request, started))
            stats.verify_seconds += timed.seconds
            while True:
                room = self.max_context - len(tokens) - 1  # tree depth that still fits in the context
                if room < 0:
                    yield self._final(assembler, FinishReason.CONTEXT, stats, started)
                    return
                batch, context = self.live, len(tokens)
                expanded = TokenTree.root_only(tokens[-1])
                depth = min(policy.max_depth, room)
                if policy.uses_draft and depth > 0:
                    budget = policy.budget(depth, self.costs, batch, context, gains)
                    opened_draft = True
                    new_tokens = tokens[draft_seen:]
                    timed = await self.draft.expand(sequence_id, new_tokens, draft_seen, budget, self._timeout(request, started))
                    draft_seen = len(tokens)
                    stats.draft_seconds += timed.seconds
                    expanded = timed.value.tree
                    self.costs.observe_draft(batch, context, timed.value.forwards(len(new_tokens)), timed.seconds)
                    if policy.cast is not None:
                        gains = update_gains(gains, expanded, timed.value.kept_per_layer)
                selected = policy.select(expanded, self.costs, batch, context)
                timed = await self.verify.verify(sequence_id, selected, sampling, self._timeout(request, started))
                stats.verify_seconds += timed.seconds
                self.costs.observe_verify(batch, context, len(selected), timed.seconds)
                committed: list[int] = timed.value
                stats.steps.append(StepRecord(len(expanded), len(selected), selected.max_depth, len(committed)))
                tokens.extend(committed)
                taken, reason = assembler.add(committed)
                if reason is not None:
                    yield self._final(assembler, reason, stats, started, taken)
                    return
                yield Chunk(assembler.take_text(final=False), taken, completion_tokens=len(assembler.token_ids))
        finally:
            self.live -= 1
            # Shielded: a cancelled request must still free its sessions on both services.
            await asyncio.shield(self._release(sequence_id, opened_draft))

    async def _release(self, sequence_id: str, opened_draft: bool) -> None:
        calls = [self.verify.release([sequence_id])]
        if opened_draft:
            calls.append(self.draft.release([sequence_id]))
        # A failed release is not the client's problem: the session's TTL frees it.
        await asyncio.gather(*calls, return_exceptions=True)

    def _final(self, assembler: TextAssembler, reason: FinishReason, stats: GenerationStats, started: float, taken=()) -> Chunk:
        stats.total_seconds = time.perf_counter() - started
        return Chunk(
            assembler.take_text(final=True),
            list(taken),
            finish_reason=reason,
            stats=stats,
            completion_tokens=len(assembler.token_ids),
        )
