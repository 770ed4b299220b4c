"""gRPC servicer: translates protos to the domain (verifier.py) and back; nothing else.

All domain calls run on one worker thread: model work stays off the event loop, and the Verifier, which is not
thread-safe, is only ever touched by that thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from cast.v1 import common_pb2, verify_pb2, verify_pb2_grpc
from cast_core.errors import CastError
from cast_core.tree import TokenTree
from verify_service.errors import abort_on_domain_error, status_code
from verify_service.sampling import SamplingParams
from verify_service.target import device_name
from verify_service.verifier import PrefillItem, Verifier, VerifyItem

log = logging.getLogger(__name__)


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

    async def verify(self, items: list[VerifyItem]) -> tuple[list, float, bool]:
        """(acceptances, seconds of the forward that ran them, whether it captured a CUDA graph)."""
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
            try:
                accepted, seconds, cold = self.verifier.verify_noting_captures([i for items, _ in batch for i in items])
            except Exception:
                pass  # one request is at fault: each alone, below
            else:
                out, start = [], 0
                for entry in batch:
                    out.append((entry, (accepted[start:start + len(entry[0])], seconds, cold)))
                    start += len(entry[0])
                return out
        out = []
        for entry in batch:
            try:
                out.append((entry, self.verifier.verify_noting_captures(entry[0])))
            except Exception as e:
                out.append((entry, e))
        return out


class VerifyServicer(verify_pb2_grpc.VerifyServiceServicer):
    def __init__(self, verifier: Verifier, executor: ThreadPoolExecutor) -> None:
        self.verifier = verifier
        self.executor = executor
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
        seconds = await self._in_worker(self.verifier.prefill, items)
        return verify_pb2.PrefillResponse(verify_seconds=seconds)

    async def verify(self, request: verify_pb2.VerifyRequest) -> verify_pb2.VerifyResponse:
        """One Verify; raises CastError."""
        items = [
            VerifyItem(s.sequence_id, tree_from_proto(s.tree), sampling_from_proto(s.sampling))
            for s in request.sequences
        ]
        accepted, seconds, cold = await self.coalescer.verify(items)
        results = [
            verify_pb2.VerifyResult(
                sequence_id=item.sequence_id,
                committed_tokens=a.committed_tokens,
                accepted_nodes=a.accepted_nodes,
            )
            for item, a in zip(items, accepted, strict=True)
        ]
        return verify_pb2.VerifyResponse(results=results, verify_seconds=seconds, cold=cold)

    async def VerifyStream(self, requests, context):
        """Verify each request in turn; a failed one is answered with its status (StepError, mapped as
        abort_on_domain_error maps a call's), and the stream goes on."""
        async for request in requests:
            try:
                reply = verify_pb2.VerifyStreamResponse(response=await self.verify(request))
            except CastError as e:
                code = status_code(e)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("unmapped domain error in VerifyStream")
                reply = verify_pb2.VerifyStreamResponse(error=common_pb2.StepError(code=code.value[0], message=str(e)))
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
