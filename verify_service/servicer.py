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


@dataclass(frozen=True)
class Forward:
    """The model forward that ran a Verify request, perhaps with others' (what its span and metrics say)."""

    seconds: float  # the forward's own time (acceptance and compaction included)
    cold: bool      # it captured a CUDA graph
    end_ns: int     # when it ended (time.time_ns)
    requests: int   # Verify requests it ran together
    sequences: int  # ... and their sequences


class Coalescer:
    """Verify requests that arrive while the model is busy run together in its next forward: orchestrators sharing
    this replica (each with its own step stream) get one batch, as a single orchestrator's sequences do.

    Each request queues its items and a job on the model's worker; the first job to run takes everything queued
    (later ones find nothing left). A merged forward that fails is run again request by request, so that only the
    request at fault gets the error (the verifier checks every item before it changes anything)."""

    def __init__(self, verifier: Verifier, executor) -> None:
        self.verifier = verifier
        self.executor = executor
        self.lock = threading.Lock()  # pending is filled on the event loop and taken on the worker
        self.pending: list[tuple[list[VerifyItem], asyncio.Future]] = []

    async def verify(self, items: list[VerifyItem]) -> tuple[list, Forward]:
        """(acceptances, the forward that ran them)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.lock:
            self.pending.append((items, future))
        batch = await loop.run_in_executor(self.executor, self.take_and_run)
        for (_, f), outcome in batch:
            if not f.done():  # its caller may have gone (a cancelled stream)
                if isinstance(outcome, BaseException):
                    f.set_exception(outcome)
                else:
                    f.set_result(outcome)
        return await future

    def take_and_run(self) -> list[tuple[tuple, object]]:
        """On the worker: run every queued request, merged if it can be; [(queued entry, result or exception)]."""
        with self.lock:
            batch, self.pending = self.pending, []
        if len(batch) > 1:
            merged = [i for items, _ in batch for i in items]
            try:
                accepted, seconds, cold = self.verifier.verify_noting_captures(merged)
            except Exception:
                pass  # one request is at fault: each alone, below
            else:
                forward = Forward(seconds, cold, time.time_ns(), len(batch), len(merged))
                out, start = [], 0
                for entry in batch:
                    out.append((entry, (accepted[start:start + len(entry[0])], forward)))
                    start += len(entry[0])
                return out
        out = []
        for entry in batch:
            try:
                accepted, seconds, cold = self.verifier.verify_noting_captures(entry[0])
                out.append((entry, (accepted, Forward(seconds, cold, time.time_ns(), 1, len(entry[0])))))
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

    async def verify(self, request: verify_pb2.VerifyRequest) -> verify_pb2.VerifyResponse:
        """One Verify; raises CastError."""
        items = [
            VerifyItem(s.sequence_id, tree_from_proto(s.tree), sampling_from_proto(s.sampling))
            for s in request.sequences
        ]
        accepted, forward = await self.coalescer.verify(items)
        self.telemetry.record_forward("verify.forward", "verify", forward.seconds, forward.end_ns, {
            "cast.device": self.description.device, "cast.forward.cold": forward.cold,
            "cast.forward.requests": forward.requests, "cast.forward.sequences": forward.sequences,
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
        async for request in requests:
            with self.telemetry.message_span(VERIFY_METHOD, request.trace_context,
                                             {"cast.sequences": len(request.sequences)}) as span:
                try:
                    reply = verify_pb2.VerifyStreamResponse(response=await self.verify(request))
                except CastError as e:
                    code = status_code(e)
                    if code == grpc.StatusCode.INTERNAL:
                        log.exception("unmapped domain error in VerifyStream")
                    set_rpc_status(span, code, str(e))
                    reply = verify_pb2.VerifyStreamResponse(error=common_pb2.StepError(code=code.value[0],
                                                                                       message=str(e)))
            yield reply

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
