"""The one place where the orchestrator calls the draft and verify services: one channel per replica.

Every call is batched: one RPC carries all sequences of a step. The per-step calls (Expand, Verify) are messages on
one long-lived bidi stream per client (ExpandStream, VerifyStream), which skips gRPC's per-call setup; a failure is
a grpc.aio.AioRpcError with the service's status code and details. Each call carries the current trace context (the
step's, a prefill's or a release's span): a unary call in its metadata, a stream message in its trace_context field.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from opentelemetry import propagate

from cast.v1 import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc
from cast_runtime.grpc_options import channel_options
from cast_runtime.telemetry import trace_metadata
from cast_core.tree import TokenTree, validate_trees
from cast_runtime.wire import tree_from_proto, tree_to_proto

STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class StepStream:
    """One bidi stream for a client's per-step calls: opened on first use, one request outstanding at a time, so
    the next message read is the answer to the request just written.

    A call that times out, is cancelled or hits a transport error cancels the stream (a late answer must never be
    read as the next call's), and the next call opens a fresh one.

    A request goes again, once, on a fresh stream only when its write failed: the stream had ended (its connection
    closed while idle, or the server restarted) and the message never left, so the service cannot have applied it.
    Once written, a request is never sent again: Expand and Verify change the services' per-sequence caches, and a
    failure after the write cannot tell whether the service applied it.
    """

    def __init__(self, open_stream: Callable[[], grpc.aio.StreamStreamCall], what: str) -> None:
        self.open_stream = open_stream
        self.what = what  # for error messages: "ExpandStream"
        self.call: grpc.aio.StreamStreamCall | None = None
        self.lock = asyncio.Lock()
        self.reopened = 0  # streams opened again because a write found the last one ended (tests read it)

    async def request(self, message, timeout: float | None):
        """The response to `message`, or AioRpcError: the service's StepError as a status, or the stream's own
        failure (DEADLINE_EXCEEDED on a timeout, as a call's deadline would)."""
        async with self.lock:
            try:
                async with asyncio.timeout(timeout):
                    call = await self._write(message)
                    reply = await call.read()
            except TimeoutError:
                self.drop()
                raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, details="Deadline Exceeded",
                                           debug_error_string=f"{self.what}: no answer in {timeout} s") from None
            except BaseException:  # cancelled, or the stream failed (AioRpcError): it cannot be trusted any more
                self.drop()
                raise
            if reply is grpc.aio.EOF:  # the server closed the stream without an error before answering
                self.drop()
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, details=f"{self.what} ended by the server")
        if reply.HasField("error"):
            code = STATUS_CODES.get(reply.error.code, grpc.StatusCode.UNKNOWN)
            raise grpc.aio.AioRpcError(code, details=reply.error.message, debug_error_string=f"{self.what}: step error")
        return reply.response

    async def _write(self, message) -> grpc.aio.StreamStreamCall:
        """Write `message` on the open stream, or on a fresh one where the open one has ended; returns the stream."""
        if self.call is None or self.call.done():  # ended since the last call (e.g. the server restarted)
            self.call = self.open_stream()
        try:
            await self.call.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # The stream ended before the message left (the core knew before this client did): not delivered.
            self.drop()
            self.call = self.open_stream()
            self.reopened += 1
            await self.call.write(message)
        return self.call

    def drop(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None


@dataclass
class Expanded:
    """A draft tree (its best nodes, as many as the policy may verify) and, per layer of the whole expansion, how
    many candidates it had, how many of them proposed children and their summed values u^(i)."""

    tree: TokenTree
    candidates_per_layer: list[int]
    kept_per_layer: list[int]
    layer_utilities: list[float]
    expanded_nodes: int  # root included, before the draft trimmed the tree
    node_levels: list[int] = field(default_factory=list)  # a cascaded Expand: each node's level (its index there)

    def forwards(self, new_tokens: int) -> list[tuple[int, int]]:
        """The draft forwards this expansion took: [(tree nodes so far, new tokens)], the committing one first."""
        out = [(0, new_tokens)]
        nodes = 0  # tree nodes already forwarded (in the draft's KV) when a layer's forward runs
        for kept in self.kept_per_layer:
            if kept:
                out.append((nodes, kept))
                nodes += kept
        return out


def expanded_from_proto(result: draft_pb2.ExpandedTree, validate: bool = True) -> Expanded:
    return Expanded(
        tree=tree_from_proto(result.tree, "draft tree", validate=validate),
        candidates_per_layer=[layer.candidates for layer in result.layers],
        kept_per_layer=[layer.kept for layer in result.layers],
        layer_utilities=[layer.kept_utility for layer in result.layers],
        expanded_nodes=result.expanded_nodes,
        node_levels=list(result.node_levels),
    )


def expansions_from_proto(results) -> list[Expanded]:
    """An Expand's trees, each checked as a tree (validate_trees: one pass for all of them)."""
    expanded = [expanded_from_proto(result, validate=False) for result in results]
    validate_trees([e.tree for e in expanded], "draft tree")
    return expanded


@dataclass(frozen=True)
class DraftItem:
    sequence_id: str
    new_tokens: list[int]  # committed since the draft's last call
    start_position: int    # position of new_tokens[0]; before what the draft holds: it rewinds there
    predict_root: bool = False  # a prepared Expand: the root is the draft's top-1 after new_tokens


@dataclass(frozen=True)
class VerifyItem:
    sequence_id: str
    tree: TokenTree
    sampling: verify_pb2.SamplingParams


def open_channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    """A channel to a replica: TLS with `credentials` (cast_runtime.tls), else plaintext."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=channel_options())
    return grpc.aio.secure_channel(address, credentials, options=channel_options())


class DraftClient:
    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self.channel = open_channel(address, credentials)
        self.stub = draft_pb2_grpc.DraftServiceStub(self.channel)
        self.stream = StepStream(self.stub.ExpandStream, "ExpandStream")

    async def describe(self, timeout: float | None = None) -> common_pb2.ReplicaDescription:
        return (await self.stub.Describe(draft_pb2.DraftDescribeRequest(), timeout=timeout)).replica

    async def expand(self, items: list[DraftItem], budget: draft_pb2.ExpandBudget | draft_pb2.CascadeBudget,
                     timeout: float | None) -> tuple[list[Expanded], float, bool]:
        """The expanded trees in order, the draft service's own seconds for the call, and whether the call captured
        a CUDA graph (then those seconds are not a step's)."""
        request = draft_pb2.ExpandRequest(
            sequences=[draft_pb2.DraftSequence(sequence_id=i.sequence_id, new_tokens=i.new_tokens,
                                               start_position=i.start_position, predict_root=i.predict_root)
                       for i in items],
        )
        if isinstance(budget, draft_pb2.CascadeBudget):
            request.cascade.CopyFrom(budget)
        else:
            request.budget.CopyFrom(budget)
        propagate.inject(request.trace_context)
        response = await self.stream.request(request, timeout)
        return expansions_from_proto(response.trees), response.draft_seconds, response.cold

    async def release(self, sequence_ids: list[str], timeout: float | None = 10.0) -> int:
        return (await self.stub.Release(draft_pb2.DraftReleaseRequest(sequence_ids=sequence_ids), timeout=timeout,
                                        metadata=trace_metadata())).released

    async def close(self) -> None:
        self.stream.drop()
        await self.channel.close()


class VerifyClient:
    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self.channel = open_channel(address, credentials)
        self.stub = verify_pb2_grpc.VerifyServiceStub(self.channel)
        self.stream = StepStream(self.stub.VerifyStream, "VerifyStream")

    async def describe(self, timeout: float | None = None) -> common_pb2.ReplicaDescription:
        return (await self.stub.Describe(verify_pb2.VerifyDescribeRequest(), timeout=timeout)).replica

    async def prefill(self, prompts: dict[str, list[int]], timeout: float | None) -> None:
        request = verify_pb2.PrefillRequest(
            sequences=[verify_pb2.PrefillSequence(sequence_id=s, token_ids=ids) for s, ids in prompts.items()]
        )
        await self.stub.Prefill(request, timeout=timeout, metadata=trace_metadata())

    async def verify(self, items: list[VerifyItem], timeout: float | None) -> tuple[list[list[int]], float, bool]:
        """Per sequence, the committed tokens (the accepted drafts, then the bonus token); the verify service's
        own seconds for the call; whether the call paid a one-time cost (a CUDA graph capture)."""
        request = verify_pb2.VerifyRequest(
            sequences=[verify_pb2.VerifySequence(sequence_id=i.sequence_id, tree=tree_to_proto(i.tree), sampling=i.sampling)
                       for i in items]
        )
        propagate.inject(request.trace_context)
        response = await self.stream.request(request, timeout)
        return [list(result.committed_tokens) for result in response.results], response.verify_seconds, response.cold

    async def release(self, sequence_ids: list[str], timeout: float | None = 10.0) -> int:
        return (await self.stub.Release(verify_pb2.VerifyReleaseRequest(sequence_ids=sequence_ids), timeout=timeout,
                                        metadata=trace_metadata())).released

    async def close(self) -> None:
        self.stream.drop()
        await self.channel.close()


async def timed(awaitable):
    """(result, wall seconds): the RPC's time, network and serialisation included."""
    start = time.perf_counter()
    result = await awaitable
    return result, time.perf_counter() - start
