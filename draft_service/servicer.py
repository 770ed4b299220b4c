"""cast.v1.DraftService over gRPC: proto <-> domain only; the model work runs in expansion.py.

All model and session work goes to one single-thread executor: it keeps the event loop free, and it
serialises every touch of the sessions (Expand, Release, expiry) without locks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cast.v1 import common_pb2, draft_pb2, draft_pb2_grpc
from cast_core.cost_table import NormalizedCostSlice
from cast_core.errors import CastError, InvalidArgument
from cast_runtime.telemetry import Telemetry, set_rpc_status
from draft_service.errors import status_code
from draft_service.expansion import Budget, CastBudget, Expander, Expansion, SequenceInput
from draft_service.levels import CascadeExpansion, Levels, cascade_from_proto

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
        for i, value in enumerate(c.depth_scales):
            if not (math.isfinite(value) and value > 0):
                raise InvalidArgument(f"must be a finite number > 0, got {value}", f"budget.cast.depth_scales[{i}]")
        for i, value in enumerate(c.sibling_scales):
            if not (math.isfinite(value) and value > 0):
                raise InvalidArgument(f"must be a finite number > 0, got {value}", f"budget.cast.sibling_scales[{i}]")
        if c.sibling_scales and not c.depth_scales:
            raise InvalidArgument("needs depth_scales (the top-1 children's scales they are capped by)",
                                  "budget.cast.sibling_scales")
        if len(c.sibling_scales) > max(budget.max_depth, len(c.depth_scales)):
            raise InvalidArgument(f"has {len(c.sibling_scales)} entries, more than max_depth {budget.max_depth} "
                                  f"and depth_scales' {len(c.depth_scales)}", "budget.cast.sibling_scales")
        breadth, depth, scales = c.breadth_threshold, c.depth_threshold, tuple(c.depth_scales)
        if not scales:  # an older client: one value_scale, and thresholds it divided by it
            scales = (c.value_scale or 1.0,)
            breadth, depth = breadth * scales[0], depth * scales[0]
        cast = CastBudget(prices, breadth, depth, c.gain_mean, step_base_cost=c.step_base_cost, depth_scales=scales,
                          sibling_scales=tuple(c.sibling_scales))
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


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, expander: Levels | Expander, replica: common_pb2.ReplicaDescription,
                 telemetry: Telemetry | None = None) -> None:
        self.expander = expander
        self.replica = replica
        self.telemetry = telemetry or Telemetry("draft")
        self.telemetry.observe_sessions(lambda: len(expander.sessions), expander.sessions.max_sessions)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-model")
        self.expiry_task: asyncio.Task | None = None  # set by the server

    async def in_executor(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def timed_expand(self, sequences, budget):
        """The trees, the seconds of the whole domain call (forwards and the tree bookkeeping between them: what
        the orchestrator prices per layer; the RPC around it is the orchestrator's to measure), and whether the
        call was cold (it captured a CUDA graph, or ran a new shape bucket's session for the first time)."""
        start, cold_runs = time.perf_counter(), self.expander.cold_runs
        trees, _ = self.expander.expand(sequences, budget)
        return trees, time.perf_counter() - start, self.expander.cold_runs > cold_runs

    async def expand(self, request: draft_pb2.ExpandRequest) -> draft_pb2.ExpandResponse:
        """One Expand; raises CastError."""
        budget = budget_from_proto(request.budget)
        if request.HasField("cascade"):
            budget = cascade_from_proto(request.cascade, budget_from_proto)
        sequences = sequences_from_proto(request.sequences)
        trees, seconds, cold = await self.in_executor(self.timed_expand, sequences, budget)
        self.telemetry.record_forward("draft.forward", "expand", seconds, time.time_ns(), {
            "cast.device": self.replica.device, "cast.forward.cold": cold, "cast.forward.sequences": len(sequences),
            "cast.forward.layers": max((len(e.layers) for e in trees), default=0),
            "cast.expanded_nodes": sum(e.expanded_nodes for e in trees)})
        return draft_pb2.ExpandResponse(trees=[expansion_to_proto(e) for e in trees], draft_seconds=seconds,
                                        cold=cold)

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
