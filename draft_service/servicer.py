"""cast.v1.DraftService over gRPC: proto <-> domain only; the model work runs in expansion.py.

All model and session work goes to one single-thread executor: it keeps the event loop free, and it
serialises every touch of the sessions (Expand, Release, expiry) without locks. Expands that wait for it run as one
expansion (Coalescer).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cast.v1 import common_pb2, draft_pb2, draft_pb2_grpc
from cast_core.cost_table import NormalizedCostSlice
from cast_core.errors import CastError, InvalidArgument
from cast_runtime.telemetry import Telemetry, set_rpc_status
from draft_service.errors import status_code
from draft_service.expansion import Budget, CastBudget, Expander, Expansion, SequenceInput
from draft_service.levels import Cascade, CascadeExpansion, Levels, cascade_from_proto

log = logging.getLogger(__name__)
EXPAND_METHOD = "/cast.v1.DraftService/Expand"  # a message's span (telemetry.message_span): one Expand


def budget_from_proto(budget: draft_pb2.ExpandBudget) -> Budget:
    cast = None
    if budget.HasField("cast"):
        c = budget.cast
        rows, cols = len(c.node_buckets), len(c.token_counts)
        if len(c.normalized_cost) != rows * cols:
            raise InvalidArgument(f"has {len(c.normalized_cost)} entries, expected {rows} x {cols}",
                                  "budget.cast.normalized_cost")
        try:
            prices = NormalizedCostSlice(
                node_buckets=tuple(c.node_buckets),
                token_counts=tuple(c.token_counts),
                normalized_cost=np.asarray(c.normalized_cost, dtype=np.float64).reshape(rows, cols),
            )
        except ValueError as exc:
            raise InvalidArgument(str(exc), "budget.cast") from None
        for field in ("value_scale", "step_base_cost"):
            value = getattr(c, field)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidArgument(f"must be a finite number >= 0, got {value}", f"budget.cast.{field}")
        cast = CastBudget(prices, c.breadth_threshold, c.depth_threshold, c.gain_mean,
                          value_scale=c.value_scale or 1.0, step_base_cost=c.step_base_cost)
    return Budget(top_k=budget.top_k, max_depth=budget.max_depth, max_breadth=budget.max_breadth, cast=cast,
                  max_returned_nodes=budget.max_returned_nodes)


def sequences_from_proto(sequences) -> list[SequenceInput]:
    return [
        SequenceInput(q.sequence_id, np.asarray(q.new_tokens, dtype=np.int64), q.start_position, q.predict_root)
        for q in sequences
    ]


def expansion_to_proto(e: Expansion) -> draft_pb2.ExpandedTree:
    t = e.tree
    return draft_pb2.ExpandedTree(
        sequence_id=e.sequence_id,
        tree=common_pb2.TokenTree(
            tokens=t.tokens.tolist(), parents=t.parents.tolist(), depths=t.depths.tolist(), values=t.values.tolist()
        ),
        layers=[draft_pb2.DraftLayerStats(candidates=s.candidates, kept=s.kept, kept_utility=u)
                for s, u in zip(e.layers, e.layer_utilities, strict=True)],
        expanded_nodes=e.expanded_nodes,
        node_levels=e.node_levels.tolist() if isinstance(e, CascadeExpansion) else [],
    )


# MEASURING ONLY, until benchmarks/gpu_replicas.sh has run: waiting Expands merged (1) or run apart (0). On the 2-core
# CPU the two could not be told apart (reports/replicas); the setting that loses on the GPU goes, and this knob too.
MERGE = os.environ.get("CAST_DRAFT_MERGE", "1") != "0"


@dataclass(frozen=True)
class Expansions:
    """What a model call gave one Expand request, perhaps run with others' (what its reply, span and metrics say)."""

    trees: list[Expansion]
    seconds: float  # the whole call's domain time: the request waited for all of it
    cold: bool      # the call ran a new shape for the first time
    requests: int   # Expand requests the call ran together
    sequences: int  # ... and their sequences


class Coalescer:
    """Expand requests that wait for the model together run as one expansion in its next turn: orchestrators
    sharing this replica (each with its own step stream) get one batch, as one orchestrator's sequences do. Each
    request keeps its own budget and gets only its own trees (Expander.expand_together decides breadth and depth per
    request, as if it ran alone: its orchestrator priced its tree for its own batch). Only requests queued while the
    model is busy merge: two orchestrators that take turns (one drafts while the other verifies) mostly do not.

    Each request queues itself and a job on the model's worker; the first job to run takes everything queued (later
    ones find nothing left). A cascade runs alone: its levels run in turn, each with its own budget, and its trees
    are merged by path; two cascades could share forwards only level by level with the same levels, and the
    cascade policies are not what orchestrators send by default. A merged expansion that fails is run again request
    by request, so that only the request at fault gets the error: an expansion validates all its input before it
    changes anything, and a request run again rewinds to its own start positions."""

    def __init__(self, expander: Levels | Expander, executor) -> None:
        self.expander = expander
        self.executor = executor
        self.lock = threading.Lock()  # pending is filled on the event loop and taken on the worker
        self.pending: list[tuple[list[SequenceInput], Budget | Cascade, asyncio.Future]] = []

    async def expand(self, sequences: list[SequenceInput], budget: Budget | Cascade) -> Expansions:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.lock:
            self.pending.append((sequences, budget, future))
        batch = await loop.run_in_executor(self.executor, self.take_and_run)
        for (_, _, f), outcome in batch:
            if not f.done():  # its caller may have gone (a cancelled stream)
                if isinstance(outcome, BaseException):
                    f.set_exception(outcome)
                else:
                    f.set_result(outcome)
        return await future

    def take_and_run(self) -> list[tuple[tuple, object]]:
        """On the worker: run every queued request, the plain ones merged if they can be; [(queued entry, result or
        exception)]."""
        with self.lock:
            batch, self.pending = self.pending, []
        plain = [entry for entry in batch if not isinstance(entry[1], Cascade)]
        out = []
        if MERGE and len(plain) > 1:
            try:
                outs, seconds, cold = self.timed(self.expander.expand_together, [(q, b) for q, b, _ in plain])
            except Exception:
                pass  # one request is at fault: each alone, below
            else:
                total = sum(len(q) for q, _, _ in plain)
                out = [(entry, Expansions(trees, seconds, cold, len(plain), total))
                       for entry, trees in zip(plain, outs)]
                batch = [entry for entry in batch if isinstance(entry[1], Cascade)]
        for entry in batch:
            try:
                trees, seconds, cold = self.timed(self.expander.expand, entry[0], entry[1])
                out.append((entry, Expansions(trees, seconds, cold, 1, len(entry[0]))))
            except Exception as e:
                out.append((entry, e))
        return out

    def timed(self, fn, *args):
        """fn's result, the seconds of the whole domain call (forwards and the tree bookkeeping between them: what
        the orchestrator prices per layer; the RPC around it is the orchestrator's to measure), and whether the
        call was cold (it captured a CUDA graph, or ran a new shape bucket's session for the first time)."""
        start, cold_runs = time.perf_counter(), self.expander.cold_runs
        result, _ = fn(*args)
        return result, time.perf_counter() - start, self.expander.cold_runs > cold_runs


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, expander: Levels | Expander, replica: common_pb2.ReplicaDescription,
                 telemetry: Telemetry | None = None) -> None:
        self.expander = expander
        self.replica = replica
        self.telemetry = telemetry or Telemetry("draft")
        self.telemetry.observe_sessions(lambda: len(expander.sessions), expander.sessions.max_sessions)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-model")
        self.coalescer = Coalescer(expander, self.executor)
        self.expiry_task: asyncio.Task | None = None  # set by the server

    async def in_executor(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def expand(self, request: draft_pb2.ExpandRequest) -> draft_pb2.ExpandResponse:
        """One Expand; raises CastError."""
        budget = budget_from_proto(request.budget)
        if request.HasField("cascade"):
            budget = cascade_from_proto(request.cascade, budget_from_proto)
        sequences = sequences_from_proto(request.sequences)
        done = await self.coalescer.expand(sequences, budget)
        trees = done.trees
        self.telemetry.record_forward("draft.forward", "expand", done.seconds, time.time_ns(), {
            "cast.device": self.replica.device, "cast.forward.cold": done.cold,
            "cast.forward.requests": done.requests, "cast.forward.sequences": done.sequences,
            "cast.forward.layers": max((len(e.layers) for e in trees), default=0),
            "cast.expanded_nodes": sum(e.expanded_nodes for e in trees)})
        return draft_pb2.ExpandResponse(trees=[expansion_to_proto(e) for e in trees], draft_seconds=done.seconds,
                                        cold=done.cold)

    async def ExpandStream(self, requests, context):
        """Expand each request in turn; a failed one is answered with its status (StepError), and the stream goes
        on."""
        async for request in requests:
            with self.telemetry.message_span(EXPAND_METHOD, request.trace_context,
                                             {"cast.sequences": len(request.sequences)}) as span:
                try:
                    reply = draft_pb2.ExpandStreamResponse(response=await self.expand(request))
                except CastError as e:
                    set_rpc_status(span, status_code(e), str(e))
                    reply = draft_pb2.ExpandStreamResponse(
                        error=common_pb2.StepError(code=status_code(e).value[0], message=str(e)))
            yield reply

    async def Release(self, request: draft_pb2.DraftReleaseRequest, context) -> draft_pb2.DraftReleaseResponse:
        released = await self.in_executor(self.expander.release, list(request.sequence_ids))
        return draft_pb2.DraftReleaseResponse(released=released)

    async def Describe(self, request: draft_pb2.DraftDescribeRequest, context) -> draft_pb2.DraftDescribeResponse:
        replica = common_pb2.ReplicaDescription()
        replica.CopyFrom(self.replica)
        replica.live_sequences = len(self.expander.sessions)  # a len() read: no need to queue behind the model
        return draft_pb2.DraftDescribeResponse(replica=replica)

    async def expire_sessions(self) -> list[str]:
        stale = await self.in_executor(self.expander.expire)
        if stale:
            log.info("expired %d idle sequences", len(stale))
        return stale

    async def expire_periodically(self, interval_s: float) -> None:
        """Background task: expire idle sessions every interval; runs until cancelled (server.py does on stop)."""
        # Not server.wait_for_termination(timeout): when cancelled it returns False instead of raising,
        # and a loop around it spins while the event loop shuts down.
        while True:
            await asyncio.sleep(interval_s)
            await self.expire_sessions()

    def close(self) -> None:
        if self.expiry_task is not None:
            self.expiry_task.cancel()
        self.executor.shutdown(wait=False)
