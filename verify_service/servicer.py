"""gRPC servicer: translates protos to the domain (verifier.py) and back; nothing else.

All domain calls run on one worker thread: model work stays off the event loop, and the Verifier, which is not
thread-safe, is only ever touched by that thread.

Telemetry (cast_runtime/telemetry.py): Prefill and Release get their server spans from the stock interceptor
(server.py), each Verify message on a stream its own (message_span); every model forward is a child span.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from cast.v1 import common_pb2, verify_pb2, verify_pb2_grpc
from cast_core.errors import CastError
from cast_core.tree import TokenTree
from cast_runtime.telemetry import Telemetry, set_rpc_status
from verify_service.errors import abort_on_domain_error, status_code
from verify_service.sampling import SamplingParams
from verify_service.target import device_name
from verify_service.verifier import PrefillItem, Verifier, VerifyItem

log = logging.getLogger(__name__)
VERIFY_METHOD = "/cast.v1.VerifyService/Verify"  # a message's span: one Verify, as if a unary call


def sampling_from_proto(msg: verify_pb2.SamplingParams) -> SamplingParams:
    """Unvalidated, like the tree; proto3's unset top_p (0) means 1."""
    return SamplingParams(
        temperature=msg.temperature,
        top_p=msg.top_p or 1.0,
        top_k=msg.top_k,
        seed=msg.seed if msg.has_seed else None,
    )


def tree_from_proto(msg: common_pb2.TokenTree) -> TokenTree:
    """Unvalidated: the Verifier validates it, naming the request field at fault."""
    return TokenTree(
        tokens=np.asarray(msg.tokens, dtype=np.int64),
        parents=np.asarray(msg.parents, dtype=np.int64),
        depths=np.asarray(msg.depths, dtype=np.int64),
        values=np.asarray(msg.values, dtype=np.float32),
    )


# The batching window (Coalescer): while more than one step stream is active, a Verify waits a little for the other
# streams' next Verify. Orchestrators each keep one step in flight, so two of them sharing this replica fall into
# turns (one verifies while the other drafts) and the model runs half batches; a request that waits for the other
# stream's puts them back into one forward. A stream is active if it sent a Verify within ACTIVE_STREAM_S; the wait is
# bounded by a fraction of the last forward (what a missed merge would cost at most) and a hard cap. One stream alone
# never waits: no other stream is active.
ACTIVE_STREAM_S = 1.0
WINDOW_FRACTION = 0.5
WINDOW_CAP_S = 0.05


@dataclass(frozen=True)
class Forward:
    """The model forward that ran a Verify request, perhaps with others' (what its span and metrics say)."""

    seconds: float  # the forward's own time (acceptance and compaction included)
    cold: bool      # it captured a CUDA graph
    end_ns: int     # when it ended (time.time_ns)
    requests: int   # Verify requests it ran together
    sequences: int  # ... and their sequences
    waited: float = 0.0  # seconds the batching window held it for other streams' requests


class Coalescer:
    """Verify requests from several step streams (orchestrators sharing this replica) run together in one forward,
    as a single orchestrator's sequences do: those that arrive while the model is busy, and, while more than one
    stream is active, those that arrive within the batching window (above).

    Each request queues its items and a job on the model's worker; the first job to run waits out the window, then
    takes everything queued (later ones find nothing left). A merged forward that fails is run again request by
    request, so that only the request at fault gets the error (the verifier checks every item before it changes
    anything)."""

    def __init__(self, verifier: Verifier, executor) -> None:
        self.verifier = verifier
        self.executor = executor
        self.window = float(os.environ.get("CAST_VERIFY_WINDOW", WINDOW_FRACTION))  # MEASURING ONLY
        self.cap = float(os.environ.get("CAST_VERIFY_WINDOW_CAP", WINDOW_CAP_S))  # MEASURING ONLY
        # Guards pending and last_request (filled on the event loop, taken on the worker); notified on each arrival.
        self.arrived = threading.Condition()
        self.pending: list[tuple[object, list[VerifyItem], asyncio.Future]] = []  # (stream, items, future)
        self.last_request: dict[object, float] = {}  # stream -> time.monotonic() of its last Verify
        self.last_forward_s = 0.0

    async def verify(self, items: list[VerifyItem], stream: object = None) -> tuple[list, Forward]:
        """(acceptances, the forward that ran them); `stream` names the step stream the request came on."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        now = time.monotonic()
        with self.arrived:
            self.last_request[stream] = now
            self.pending.append((stream, items, future))
            self.arrived.notify()
        deadline = now + min(self.cap, self.window * self.last_forward_s)
        batch = await loop.run_in_executor(self.executor, self.take_and_run, deadline)
        for (_, _, f), outcome in batch:
            if not f.done():  # its caller may have gone (a cancelled stream)
                if isinstance(outcome, BaseException):
                    f.set_exception(outcome)
                else:
                    f.set_result(outcome)
        return await future

    def stream_ended(self, stream: object) -> None:
        with self.arrived:
            self.last_request.pop(stream, None)
            self.arrived.notify()

    def awaited_streams(self, now: float) -> int:
        """Active streams with no request queued (call with the lock held)."""
        queued = {stream for stream, _, _ in self.pending}
        return sum(1 for stream, last in self.last_request.items()
                   if stream not in queued and now - last < ACTIVE_STREAM_S)

    def take_and_run(self, deadline: float) -> list[tuple[tuple, object]]:
        """On the worker: wait out the window, then run every queued request, merged if it can be;
        [(queued entry, result or exception)]."""
        start, waited = time.monotonic(), 0.0
        with self.arrived:
            while self.pending and self.awaited_streams(now := time.monotonic()) and now < deadline:
                self.arrived.wait(deadline - now)
                waited = time.monotonic() - start
            batch, self.pending = self.pending, []
        if len(batch) > 1:
            merged = [i for _, items, _ in batch for i in items]
            try:
                accepted, seconds, cold = self.verifier.verify_noting_captures(merged)
            except Exception:
                pass  # one request is at fault: each alone, below
            else:
                self.last_forward_s = seconds
                forward = Forward(seconds, cold, time.time_ns(), len(batch), len(merged), waited)
                out, start = [], 0
                for entry in batch:
                    out.append((entry, (accepted[start:start + len(entry[1])], forward)))
                    start += len(entry[1])
                return out
        out = []
        for entry in batch:
            try:
                accepted, seconds, cold = self.verifier.verify_noting_captures(entry[1])
                self.last_forward_s = seconds
                out.append((entry, (accepted, Forward(seconds, cold, time.time_ns(), 1, len(entry[1]), waited))))
            except Exception as e:
                out.append((entry, e))
        return out


class VerifyServicer(verify_pb2_grpc.VerifyServiceServicer):
    def __init__(self, verifier: Verifier, executor: ThreadPoolExecutor, telemetry: Telemetry | None = None) -> None:
        self.verifier = verifier
        self.executor = executor
        self.telemetry = telemetry or Telemetry("verify")
        self.telemetry.observe_sessions(lambda: len(verifier.sessions), verifier.sessions.max_sessions, occupancy=True)
        target = verifier.target
        self.description = common_pb2.ReplicaDescription(
            model_name=target.model_name,
            vocab_hash=target.vocab_hash,
            vocab_size=target.vocab_size,
            max_context=target.max_context,
            device=device_name(target.device),
            dtype=target.dtype_name,
            backend="torch",
            max_sequences=verifier.sessions.max_sessions,
        )

    @functools.cached_property
    def coalescer(self) -> Coalescer:
        return Coalescer(self.verifier, self.executor)

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    @abort_on_domain_error
    async def Prefill(self, request: verify_pb2.PrefillRequest, context) -> verify_pb2.PrefillResponse:
        items = [PrefillItem(s.sequence_id, list(s.token_ids)) for s in request.sequences]
        seconds, end_ns = await self._in_worker(lambda: (self.verifier.prefill(items), time.time_ns()))
        self.telemetry.record_forward("verify.prefill_forward", "prefill", seconds, end_ns, {
            "cast.device": self.description.device, "cast.forward.sequences": len(items),
            "cast.forward.tokens": sum(len(i.token_ids) for i in items)})
        return verify_pb2.PrefillResponse(verify_seconds=seconds)

    async def verify(self, request: verify_pb2.VerifyRequest, stream: object = None) -> verify_pb2.VerifyResponse:
        """One Verify (from `stream`, the step stream it came on); raises CastError."""
        items = [
            VerifyItem(s.sequence_id, tree_from_proto(s.tree), sampling_from_proto(s.sampling))
            for s in request.sequences
        ]
        accepted, forward = await self.coalescer.verify(items, stream)
        self.telemetry.record_forward("verify.forward", "verify", forward.seconds, forward.end_ns, {
            "cast.device": self.description.device, "cast.forward.cold": forward.cold,
            "cast.forward.requests": forward.requests, "cast.forward.sequences": forward.sequences,
            "cast.forward.waited_s": forward.waited,
            "cast.forward.tokens": sum(len(i.tree) for i in items)})
        results = [
            verify_pb2.VerifyResult(
                sequence_id=item.sequence_id,
                committed_tokens=a.committed_tokens,
                accepted_nodes=a.accepted_nodes,
            )
            for item, a in zip(items, accepted, strict=True)
        ]
        return verify_pb2.VerifyResponse(results=results, verify_seconds=forward.seconds, cold=forward.cold)

    async def VerifyStream(self, requests, context):
        """Verify each request in turn; a failed one is answered with its status (StepError, mapped as
        abort_on_domain_error maps a call's), and the stream goes on."""
        stream = object()  # this stream's key in the coalescer's batching window
        try:
            async for request in requests:
                with self.telemetry.message_span(VERIFY_METHOD, request.trace_context,
                                                 {"cast.sequences": len(request.sequences)}) as span:
                    try:
                        reply = verify_pb2.VerifyStreamResponse(response=await self.verify(request, stream))
                    except CastError as e:
                        code = status_code(e)
                        if code == grpc.StatusCode.INTERNAL:
                            log.exception("unmapped domain error in VerifyStream")
                        set_rpc_status(span, code, str(e))
                        reply = verify_pb2.VerifyStreamResponse(error=common_pb2.StepError(code=code.value[0],
                                                                                           message=str(e)))
                yield reply
        finally:
            self.coalescer.stream_ended(stream)  # the others stop waiting for it

    @abort_on_domain_error
    async def Release(self, request: verify_pb2.VerifyReleaseRequest, context) -> verify_pb2.VerifyReleaseResponse:
        released = await self._in_worker(self.verifier.release, list(request.sequence_ids))
        return verify_pb2.VerifyReleaseResponse(released=released)

    async def Describe(self, request: verify_pb2.VerifyDescribeRequest, context) -> verify_pb2.VerifyDescribeResponse:
        replica = common_pb2.ReplicaDescription()
        replica.CopyFrom(self.description)
        replica.live_sequences = len(self.verifier.sessions)
        replica.max_sequences = self.verifier.sessions.max_sessions
        return verify_pb2.VerifyDescribeResponse(replica=replica)

    async def expire_idle_sessions(self) -> list[str]:
        return await self._in_worker(self.verifier.expire)


async def expire_sessions_until_stopped(server: grpc.aio.Server, servicer: VerifyServicer, interval_s: float) -> None:
    """Drop idle sequences every interval_s until the server stops, then let the worker thread go."""
    try:
        # wait_for_termination returns True when it timed out, i.e. the server is still running.
        while await server.wait_for_termination(timeout=interval_s):
            await servicer.expire_idle_sessions()
    finally:
        servicer.executor.shutdown(wait=False)
