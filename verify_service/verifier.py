"""The verify service's domain: sequences, their KV caches and pending tokens, Prefill / Verify / Release.

No gRPC here. A Verifier is not thread-safe: the servicer calls it from one worker thread only, which also
serialises model work. Each batched call validates every sequence first and only then touches the model, so a
bad sequence leaves the others of its request untouched.

The KV store (kv_cache.py) has max_batch slots, allocated once: at most max_batch live sequences (more get
RESOURCE_EXHAUSTED), and trees of at most max_tree_tokens nodes (larger ones get INVALID_ARGUMENT naming the
tree). Prefills run eagerly (target.py); verifies run in bucketed shapes, as CUDA graphs on CUDA
(static_forward.py).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cast_core.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from cast_core.tree import TokenTree
from cast_runtime.sessions import SessionStore
from verify_service.acceptance import Acceptance, accept_matching
from verify_service.kv_cache import SequenceKV
from verify_service.sampling import GREEDY, SamplingParams, target_tokens
from verify_service.static_forward import StaticForward, static_store
from verify_service.target import TargetModel


@dataclass
class Session:
    kv: SequenceKV | None  # every committed token but the last (None only while prefill() creates it)
    pending: int  # the last committed token: the root of the next tree


@dataclass(frozen=True)
class PrefillItem:
    sequence_id: str
    token_ids: Sequence[int]


@dataclass(frozen=True)
class VerifyItem:
    sequence_id: str
    tree: TokenTree  # as received: validated here
    sampling: SamplingParams = GREEDY  # as received: validated here


class Sessions(SessionStore[Session]):
    """A SessionStore that gives a sequence's KV slot back whenever its session ends: released, expired, or
    expired inside create()."""

    def release(self, sequence_ids) -> int:
        for sequence_id in sequence_ids:
            entry = self._entries.get(sequence_id)
            if entry is not None and entry.state.kv is not None:
                entry.state.kv.free()  # idempotent: an id repeated in one call frees once
        return super().release(sequence_ids)

    def expire(self) -> list[str]:
        states = {sequence_id: entry.state for sequence_id, entry in self._entries.items()}
        stale = super().expire()
        for sequence_id in stale:
            if states[sequence_id].kv is not None:
                states[sequence_id].kv.free()
        return stale


class Verifier:
    def __init__(self, target: TargetModel, max_batch: int, session_ttl_s: float, max_tree_tokens: int = 128,
                 clock=time.monotonic) -> None:
        self.target = target
        self.kv = static_store(target, max_batch, max_tree_tokens)  # every sequence's KV, one slot each
        self.static = StaticForward(target, self.kv, max_tree_tokens)
        self.sessions = Sessions(max_sessions=max_batch, ttl_s=session_ttl_s, clock=clock)

    def prefill(self, items: Sequence[PrefillItem]) -> float:
        """Create one session per item, then one padded forward over all prompts; returns the seconds spent."""
        self._check_prefill(items)
        if not items:
            return 0.0
        created: list[str] = []
        start = time.perf_counter()
        try:
            kvs = []
            for item in items:
                # The session first: its cap check (which may expire idle sequences, freeing their slots) comes
                # before the slot is taken, and before a forward that would be thrown away.
                session = self.sessions.create(item.sequence_id, Session(kv=None, pending=int(item.token_ids[-1])))
                created.append(item.sequence_id)
                session.kv = self.kv.allocate()
                kvs.append(session.kv)
            self.target.prefill(kvs, [item.token_ids[:-1] for item in items])
        except BaseException:
            self.sessions.release(created)  # all or nothing
            raise
        return time.perf_counter() - start

    def verify(self, items: Sequence[VerifyItem]) -> tuple[list[Acceptance], float]:
        """One tree forward for all sequences, acceptance (greedy or sampled) per sequence, KV compaction. Returns
        results in order and model seconds."""
        sessions = self._check_verify(items)
        if not items:  # nothing to verify (the draft service answers an empty Expand alike)
            return [], 0.0
        start = time.perf_counter()
        kvs = [s.kv for s in sessions]
        prefix_lengths = [kv.length for kv in kvs]
        # Unseeded sampling: a fresh seed per call is still exact (fresh noise), just not reproducible.
        seeds = [item.sampling.seed if item.sampling.seed is not None else secrets.randbits(63) for item in items]
        # A failure before keep() leaves every cache as it was: the forward only wrote past each sequence's length.
        all_logits = self.static.tree_logits(kvs, [item.tree for item in items])
        accepted = []
        for item, logits, prefix_length, seed in zip(items, all_logits, prefix_lengths, seeds, strict=True):
            # The root is token prefix_length of the sequence: depth-0 nodes predict token prefix_length + 1.
            chosen = target_tokens(logits, item.tree.depths, prefix_length + 1, item.sampling, seed)  # [N]
            accepted.append(accept_matching(item.tree, chosen))
        # Keep the root (now committed) and the accepted nodes; the bonus token becomes the next root.
        self.kv.keep(kvs, [[0, *acceptance.accepted_nodes] for acceptance in accepted])
        for session, acceptance in zip(sessions, accepted, strict=True):
            session.pending = acceptance.bonus_token
        return accepted, time.perf_counter() - start

    def verify_noting_captures(self, items: Sequence[VerifyItem]) -> tuple[list[Acceptance], float, bool]:
        """verify(), and whether the call captured a CUDA graph: a one-time cost of many steps that whoever
        measures steps (the orchestrator's cost model and draft gate) must not take for a step's cost."""
        before = self.captures
        accepted, seconds = self.verify(items)
        return accepted, seconds, self.captures != before

    @property
    def captures(self) -> int:
        return self.static.captures

    def release(self, sequence_ids: Sequence[str]) -> int:
        return self.sessions.release(sequence_ids)

    def expire(self) -> list[str]:
        return self.sessions.expire()

    def warm_up(self) -> None:
        """One prefill and one two-node verify, so first-call costs (allocator, kernels) are paid before serving."""
        warm_id = "__verify_service_warmup__"
        token = 0
        self.prefill([PrefillItem(warm_id, [token, token])])
        try:
            tree = TokenTree.from_lists([token, token], [-1, 0], [0, 1], [1.0, 1.0])
            self.verify([VerifyItem(warm_id, tree)])
        finally:
            self.release([warm_id])

    def _check_prefill(self, items: Sequence[PrefillItem]) -> None:
        seen: set[str] = set()
        for i, item in enumerate(items):
            field = f"sequences[{i}]"
            if not item.sequence_id:
                raise InvalidArgument("must not be empty", f"{field}.sequence_id")
            if item.sequence_id in seen:
                raise InvalidArgument(f"sequence {item.sequence_id!r} appears twice in one request", f"{field}.sequence_id")
            seen.add(item.sequence_id)
            if item.sequence_id in self.sessions:
                raise InvalidArgument(f"sequence {item.sequence_id!r} already exists", f"{field}.sequence_id")
            if len(item.token_ids) == 0:
                raise InvalidArgument("a prompt needs at least one token", f"{field}.token_ids")
            if len(item.token_ids) > self.target.max_context:
                raise OutOfRange(
                    f"{len(item.token_ids)} tokens exceed the context limit of {self.target.max_context}",
                    f"{field}.token_ids",
                )
            for j, token in enumerate(item.token_ids):
                if not 0 <= token < self.target.vocab_size:
                    raise InvalidArgument(
                        f"token {token} is outside the vocabulary [0, {self.target.vocab_size})", f"{field}.token_ids[{j}]"
                    )

    def _check_verify(self, items: Sequence[VerifyItem]) -> list[Session]:
        sessions = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            field = f"sequences[{i}]"
            if item.sequence_id in seen:
                raise InvalidArgument(f"sequence {item.sequence_id!r} appears twice in one request", f"{field}.sequence_id")
            seen.add(item.sequence_id)
            try:
                session = self.sessions.get(item.sequence_id)
            except NotFound as e:
                raise NotFound(str(e).removeprefix(f"{e.field}: "), f"{field}.sequence_id") from None
            item.tree.validate(field=f"{field}.tree", vocab_size=self.target.vocab_size)
            if len(item.tree) > self.static.max_tree_tokens:
                raise InvalidArgument(
                    f"a tree of {len(item.tree)} nodes exceeds the verifier's limit of {self.static.max_tree_tokens} "
                    f"(--max-tree-tokens)",
                    f"{field}.tree.tokens",
                )
            if int(item.tree.tokens[0]) != session.pending:
                raise FailedPrecondition(
                    f"the root must be the sequence's last committed token {session.pending}, "
                    f"not {int(item.tree.tokens[0])}",
                    f"{field}.tree.tokens[0]",
                )
            if session.kv.length + item.tree.max_depth + 1 > self.target.max_context:
                raise OutOfRange(
                    f"{session.kv.length} cached tokens + a tree of depth {item.tree.max_depth} + 1 exceed the "
                    f"context limit of {self.target.max_context}",
                    f"{field}.tree.depths",
                )
            check_sampling(item.sampling, f"{field}.sampling")
            sessions.append(session)
        return sessions


def check_sampling(params: SamplingParams, field: str) -> None:
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise InvalidArgument(f"must be 0 (greedy) or positive, got {params.temperature}", f"{field}.temperature")
    if not 0 < params.top_p <= 1:  # also catches NaN
        raise InvalidArgument(f"must be in (0, 1] (0 in the proto means 1), got {params.top_p}", f"{field}.top_p")
    if params.top_k < 0:
        raise InvalidArgument(f"must be 0 (off) or positive, got {params.top_k}", f"{field}.top_k")
