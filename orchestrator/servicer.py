"""GenerationService: translates protos to the decoding loop's types and back (validation: requests.py).

Each call's server span comes from the stock gRPC interceptor (server.py); here it gets the GenAI attributes
(telemetry.py), and a call that the client cancelled or whose deadline passed gets that status, which the stock
interceptor leaves out.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import grpc
from opentelemetry import trace

from cast.v1 import generation_pb2, generation_pb2_grpc
from cast_core.errors import CastError, InvalidArgument
from cast_runtime.telemetry import cancellation_code, set_rpc_status, trace_id
from orchestrator.decoding import Chunk, FinishReason, GenerationRequest, GenerationStats, StepTiming
from orchestrator.auth import ClientLimits
from orchestrator.router import Router
from orchestrator.errors import abort_with
from orchestrator.requests import RequestBuilder

FINISH_REASONS = {
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: generation_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.CONTEXT: generation_pb2.FINISH_REASON_CONTEXT,
}


def timing_fields(timing: StepTiming | None) -> dict[str, float]:
    if timing is None:
        return {}
    return {
        "step_seconds": timing.step,
        "draft_rpc_seconds": timing.draft_rpc,
        "draft_model_seconds": timing.draft_model,
        "verify_rpc_seconds": timing.verify_rpc,
        "verify_model_seconds": timing.verify_model,
        "predicted_draft_ms": timing.predicted_draft_ms,
        "predicted_verify_ms": timing.predicted_verify_ms,
    }


def stats_to_proto(stats: GenerationStats, with_steps: bool) -> generation_pb2.GenerationStats:
    msg = generation_pb2.GenerationStats(
        policy=stats.policy,
        steps=len(stats.steps),
        mean_accepted_length=stats.mean_accepted_length,
        draft_seconds=stats.draft_seconds,
        verify_seconds=stats.verify_seconds,
        other_seconds=max(stats.total_seconds - stats.draft_seconds - stats.verify_seconds, 0.0),
        total_seconds=stats.total_seconds,
        replays=stats.replays,
    )
    if with_steps:
        msg.step_stats.extend(
            generation_pb2.StepStats(
                expanded_nodes=s.expanded_nodes, verified_nodes=s.verified_nodes, depth=s.depth, accepted_tokens=s.accepted_tokens,
                pipeline=s.pipeline, arm=s.arm, mode=s.mode, **timing_fields(s.timing),
            )
            for s in stats.steps
        )
    return msg


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, router: Router, requests: RequestBuilder, limits: ClientLimits | None = None) -> None:
        self.router = router
        self.requests = requests  # validation, shared with the HTTP API
        # The router's generate, holding one of the calling client's slots while it runs (auth.py)
        self.route = limits.limit(router.generate) if limits is not None else router.generate

    def to_request(self, msg: generation_pb2.GenerateRequest) -> GenerationRequest:
        if msg.max_new_tokens <= 0:  # proto3's 0 is unset: the HTTP API's "as many as fit" is not the gRPC API's
            raise InvalidArgument(f"must be positive, got {msg.max_new_tokens}", "max_new_tokens")
        return self.requests.build(
            msg.prompt, msg.max_new_tokens, policy=msg.policy, stop=msg.stop, temperature=msg.temperature,
            top_p=msg.top_p or 1.0,  # 0 is proto3's unset: it means 1 (off)
            top_k=msg.top_k, seed=msg.seed if msg.HasField("seed") else None, ignore_eos=msg.ignore_eos,
        )

    def generate(self, domain: GenerationRequest, context):
        """The request's chunks, traced and measured (telemetry.py) under the call's server span."""
        span = trace.get_current_span()
        return self.router.telemetry.observe(self.route(domain, span), domain, "text_completion", span,
                                             lambda: cancellation_code(context))

    async def Generate(self, request, context):
        text: list[str] = []
        token_ids: list[int] = []
        final: Chunk | None = None
        try:
            domain = self.to_request(request)
            async with aclosing(self.generate(domain, context)) as chunks:
                async for chunk in chunks:
                    text.append(chunk.text)
                    token_ids.extend(chunk.token_ids)
                    final = chunk
        except (CastError, grpc.aio.AioRpcError) as exc:
            await abort_with(context, exc)
        except asyncio.CancelledError:
            set_rpc_status(trace.get_current_span(), cancellation_code(context))
            raise
        assert final is not None and final.stats is not None
        return generation_pb2.GenerateResponse(
            text="".join(text),
            token_ids=token_ids,
            finish_reason=FINISH_REASONS[final.finish_reason],
            usage=generation_pb2.Usage(prompt_tokens=len(domain.prompt_ids), completion_tokens=final.completion_tokens),
            stats=stats_to_proto(final.stats, request.return_step_stats),
            trace_id=trace_id(trace.get_current_span()),
        )

    async def GenerateStream(self, request, context):
        request_trace_id = trace_id(trace.get_current_span())
        try:
            domain = self.to_request(request)
            async with aclosing(self.generate(domain, context)) as chunks:
                async for chunk in chunks:
                    msg = generation_pb2.GenerateStreamResponse(text=chunk.text, token_ids=chunk.token_ids,
                                                                trace_id=request_trace_id)
                    if chunk.finish_reason is not None:
                        msg.finish_reason = FINISH_REASONS[chunk.finish_reason]
                        msg.usage.CopyFrom(generation_pb2.Usage(prompt_tokens=len(domain.prompt_ids),
                                                                completion_tokens=chunk.completion_tokens))
                        msg.stats.CopyFrom(stats_to_proto(chunk.stats, request.return_step_stats))
                    yield msg
        except (CastError, grpc.aio.AioRpcError) as exc:
            await abort_with(context, exc)
        except asyncio.CancelledError:
            set_rpc_status(trace.get_current_span(), cancellation_code(context))
            raise

    async def ListReplicas(self, request, context):
        return generation_pb2.ListReplicasResponse(
            replicas=[
                generation_pb2.ReplicaStatus(
                    role=r.role, address=r.address, state=r.state.value, live_sequences=r.sequences,
                    max_sequences=r.slots, device=r.description.device if r.description else "",
                    model_name=r.description.model_name if r.description else "",
                )
                for r in sorted(self.router.fleet.replicas.values(), key=lambda r: (r.role, r.address))
            ],
            replays=self.router.replays,
        )
