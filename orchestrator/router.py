"""The orchestrator's requests over its fleet of replicas.

Each sequence is pinned to one verify replica (whose step loop batches it with every other sequence there) and one
draft replica, both picked by load (fleet.py). The pins hold the services' caches, so they change only when a
replica fails or drains:
- verify replica lost: the sequence is replayed on another one, its prompt and every committed token prefilled
  again. Verification is deterministic (greedy) or keyed by (seed, position) (sampling), so the output is the same;
  the client sees a longer step. With no verify replica serving, it waits (up to `orphan_timeout_s`) for one.
- draft replica lost: the sequence verifies its root alone (plain decoding) until another draft replica serves,
  which then reads its committed tokens. Losing every draft slows requests and fails none.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
from opentelemetry import trace

from cast.v1 import verify_pb2
from cast_core.errors import ResourceExhausted, Unavailable
from orchestrator.decoding import Chunk, GenerationRequest, GenerationStats, TextAssembler
from orchestrator.fleet import Fleet, Replica, State
from orchestrator.step_loop import MAX_REPLAYS, LiveSequence, StepLoop
from orchestrator.telemetry import OrchestratorTelemetry

log = logging.getLogger("cast.orchestrator")
# How long a release that failed is tried again: the services' default session TTL, by when they freed it anyway.
RELEASE_RETRY_S = 600.0


class Router:
    def __init__(self, fleet: Fleet, tokenizer, max_context: int, rpc_timeout_s: float = 60.0, max_live: int = 32,
                 max_queued: int = 256, orphan_timeout_s: float = 60.0,
                 telemetry: OrchestratorTelemetry | None = None, pipeline: bool = False) -> None:
        self.fleet = fleet
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.rpc_timeout_s = rpc_timeout_s
        self.max_live = max_live          # sequences per verify replica at most (and its slots)
        self.max_queued = max_queued      # waiting requests at most; past it, RESOURCE_EXHAUSTED at once
        self.orphan_timeout_s = orphan_timeout_s
        self.pipeline = pipeline          # draft the next step's tree while a step is verified (step_loop.py)
        self.loops: dict[Replica, StepLoop] = {}
        self.orphans: list[LiveSequence] = []  # lost their verify replica and found no other yet
        self.background: set[asyncio.Task] = set()
        self.replays = 0
        self.telemetry = telemetry or OrchestratorTelemetry()
        self.telemetry.observe_router(self)
        fleet.listeners.append(self.on_fleet_change)

    # --- the request's side ---------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, span: trace.Span | None = None) -> AsyncIterator[Chunk]:
        """The request's chunks as its steps commit them. `span`: the request's server span (default: the current
        span), the parent of its queue, prefill and replay spans and what its steps link to."""
        waiting = len(self.orphans) + sum(len(loop.waiting) for loop in self.loops.values())
        if waiting >= self.max_queued:
            live = sum(len(loop.live) for loop in self.loops.values())
            raise ResourceExhausted(f"{live} sequences live and {waiting} queued: the server is full, retry later")
        seq = LiveSequence(
            request=request,
            assembler=TextAssembler(self.tokenizer, request.prompt_ids, request, self.tokenizer.eos_token_id),
            stats=GenerationStats(policy=request.policy.name),
            tokens=list(request.prompt_ids),
            sampling=verify_pb2.SamplingParams(
                temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                seed=request.seed or 0, has_seed=request.seed is not None,
            ),
            trace=self.telemetry.request_trace(span or trace.get_current_span()),
        )
        if request.policy.uses_draft:
            self.keep_draft_replica(seq)
        self.place(seq)
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
            # Cancelled, timed out or finished: its loop releases the sessions at the next boundary.
            seq.trace.close("the request ended while waiting")  # (spans still open: a queue, prefill or replay)
            seq.done = True
            if seq.loop is not None:
                seq.loop.wake()
            elif seq in self.orphans:  # its verify session went at the replay; its draft session goes now
                self.orphans.remove(seq)
                self.drop_draft_replica(seq)
                self.forget(seq)

    # --- placement ------------------------------------------------------------------------------------------

    def place(self, s: LiveSequence, front: bool = False) -> None:
        """Pin the sequence to the least loaded serving verify replica and queue it in that replica's loop; with
        none serving, it waits as an orphan."""
        replica = self.fleet.pick_verify({r: len(loop.waiting) for r, loop in self.loops.items()})
        s.trace.enter("queue")
        if replica is None:
            s.loop, s.lost_since = None, asyncio.get_running_loop().time()
            self.orphans.append(s)
            self._ensure_housekeeping()
            return
        loop = self.loops.get(replica)
        if loop is None:
            loop = self.loops[replica] = StepLoop(replica, self)
        replica.sequences += 1
        s.loop, s.admitted = loop, False
        loop.enqueue(s, front)

    def replay(self, sequences: list[LiveSequence], source: StepLoop) -> None:
        """Sequences that leave `source` (its replica failed or drains) start again elsewhere, ahead of new requests;
        their sessions there are released in the background (again while it does not answer)."""
        admitted = [s.verify_id for s in sequences if s.admitted]
        if admitted:
            self._background(self.release(source.replica, admitted))
        for s in sequences:
            if s.done:
                self.drop_draft_replica(s)
                self.forget(s)
                continue
            source.replica.sequences -= 1
            s.loop = None
            # A new session id: the old one may still be held where it was (a replica that stalled, or whose
            # release is still on its way), and the sequence may come back there.
            s.verify_id = uuid.uuid4().hex
            s.stats.replays += 1
            self.replays += 1
            self.telemetry.replays.add(1)
            s.trace.replayed(source.replica.address, source.replica.state.value, s.stats.replays)
            if s.stats.replays > MAX_REPLAYS:
                s.fail(Unavailable(f"sequence {s.sequence_id} failed on {MAX_REPLAYS + 1} verify replicas"))
                self.drop_draft_replica(s)
                continue
            self.place(s, front=True)
        log.info("%d sequences leave verify replica %s (%s): replayed elsewhere", len(sequences), source.replica.address,
                 source.replica.state.value)

    def keep_draft_replica(self, s: LiveSequence) -> None:
        """Give the sequence a serving draft replica if its own is down or gone, or draining while another serves.
        A new replica reads the sequence's committed tokens on its first Expand."""
        if not s.policy.uses_draft or (s.draft is not None and s.draft.serving):
            return
        if s.draft is not None and s.draft.state is State.DRAINING and not self.fleet.serving("draft"):
            return  # it still answers: keep it while no other serves
        replacement = self.fleet.pick_draft()
        if replacement is None and s.draft is None:
            return
        self.drop_draft_replica(s)
        if replacement is not None:
            s.draft = replacement
            replacement.sequences += 1

    def drop_draft_replica(self, s: LiveSequence) -> None:
        """The sequence leaves its draft replica (released there in the background): plain steps until another."""
        if s.draft is None:
            return
        if s.opened_draft:
            # Not once the sequence is back there and has drafted again (its session is in use again); back there
            # but not drafting (plain steps), it may end without another Expand, and nothing else would release it.
            replica = s.draft
            self._background(self.release(replica, [s.sequence_id],
                                          wanted=lambda _: s.draft is not replica or not s.opened_draft))
        s.draft.sequences -= 1
        s.draft, s.draft_seen, s.opened_draft = None, 0, False

    def forget(self, s: LiveSequence) -> None:
        """A sequence that left for good no longer counts on its replicas."""
        if s.loop is not None:
            s.loop.replica.sequences -= 1
            s.loop = None
        if s.draft is not None:
            s.draft.sequences -= 1
            s.draft = None

    def on_fleet_change(self) -> None:
        """A replica changed state: orphans try again, and every loop looks at its replicas at its next boundary."""
        orphans, self.orphans = self.orphans, []
        for s in orphans:
            if not s.done:
                self.place(s, front=True)
        for loop in self.loops.values():
            if loop.sequences:
                loop.wake()

    # --- releases -------------------------------------------------------------------------------------------

    async def release(self, replica: Replica, ids: list[str], timeout_s: float = 5.0,
                      wanted: Callable[[str], bool] = lambda _: True) -> None:
        """Release sessions on a replica: one call now and, where it fails (the replica stalled past the deadline,
        or is unreachable a while), again in the background until it answers. A session left there would hold
        its slot (a verify replica's KV memory) for the service's whole TTL. `wanted(id)`: whether an id still
        needs releasing when the call goes."""
        ids = [i for i in ids if wanted(i)]
        if not ids:
            return
        try:
            await replica.client.release(ids, timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.info("releasing %d sequences on %s replica %s failed (%s): trying again", len(ids), replica.role,
                     replica.address, exc.code().name)
            self._background(self._release_again(replica, ids, timeout_s, wanted))

    async def _release_again(self, replica: Replica, ids: list[str], timeout_s: float,
                             wanted: Callable[[str], bool]) -> None:
        """Retries of a failed release, with backoff, while the fleet lists the replica, for RELEASE_RETRY_S."""
        clock = asyncio.get_running_loop()
        give_up, delay = clock.time() + RELEASE_RETRY_S, 0.5
        while clock.time() < give_up and self.fleet.replicas.get((replica.role, replica.address)) is replica:
            await asyncio.sleep(delay)
            ids = [i for i in ids if wanted(i)]
            if not ids:
                return
            try:
                await replica.client.release(ids, timeout_s)
                return
            except grpc.aio.AioRpcError:
                delay = min(2 * delay, 10.0)

    # --- housekeeping ---------------------------------------------------------------------------------------

    def _ensure_housekeeping(self) -> None:
        if not any(t.get_name() == "orphans" for t in self.background):
            self._background(self._expire_orphans(), name="orphans")

    async def _expire_orphans(self) -> None:
        """Fail orphans that found no verify replica within orphan_timeout_s."""
        while self.orphans:
            await asyncio.sleep(0.25)
            now = asyncio.get_running_loop().time()
            for s in [s for s in self.orphans if now - s.lost_since > self.orphan_timeout_s]:
                self.orphans.remove(s)
                s.fail(Unavailable(f"no verify replica served for {self.orphan_timeout_s:.0f} s"))
                self.drop_draft_replica(s)
                self.forget(s)

    def _background(self, coroutine, name: str | None = None) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failed release is nobody's error

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop every loop and release every session; requests still running end with UNAVAILABLE."""
        orphans, self.orphans = self.orphans, []
        for s in orphans:
            s.fail(Unavailable("the orchestrator is shutting down"))
        # Their verify sessions went when they were replayed; their draft sessions go now.
        await asyncio.gather(*(self.release(s.draft, [s.sequence_id], timeout_s) for s in orphans
                               if s.opened_draft and s.draft is not None), return_exceptions=True)
        await asyncio.gather(*(loop.close(timeout_s) for loop in self.loops.values()))
        for task in list(self.background):
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
