"""The orchestrator's traces and metrics.

A request's trace: its server span (gRPC `Generate`/`GenerateStream`, or the HTTP API's), with the GenAI
attributes, and under it `queue` (waiting for a verify slot) and `prefill` (its prompt's Prefill); after a failover a
`replay` span holds the queue and prefill of its new replica. Work that serves a batch is a trace of its own, linked to
the trace of every request it served: a `step` span per decoding step of a verify replica's loop (the draft and
verify services' Expand and Verify spans are its children: the step's context travels in the messages), a `prefill`
span per Prefill call, a `release` span per Release. A request's `prefill` span links to its batch's.

Batches are traced only where one of their requests is sampled, so a sampler's ratio holds for the steps too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Link, Status, StatusCode

from cast_runtime.telemetry import (
    ERROR_TYPE, GEN_AI_OPERATION_NAME, GEN_AI_PROVIDER_NAME, GEN_AI_REQUEST_MAX_TOKENS, GEN_AI_REQUEST_MODEL,
    GEN_AI_REQUEST_STOP_SEQUENCES, GEN_AI_REQUEST_TEMPERATURE, GEN_AI_REQUEST_TOP_K,
    GEN_AI_REQUEST_TOP_P, GEN_AI_RESPONSE_FINISH_REASONS, GEN_AI_RESPONSE_MODEL, GEN_AI_SERVER_REQUEST_DURATION,
    GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN, GEN_AI_SERVER_TIME_TO_FIRST_TOKEN, GEN_AI_TOKEN_TYPE,
    GEN_AI_USAGE_INPUT_TOKENS, GEN_AI_USAGE_OUTPUT_TOKENS, PROVIDER, REQUEST_DURATION_BUCKETS,
    STEP_SECONDS_BUCKETS, TIME_PER_OUTPUT_TOKEN_BUCKETS, TIME_TO_FIRST_TOKEN_BUCKETS, TOKEN_USAGE_BUCKETS, Telemetry,
)
from orchestrator.decoding import Chunk, FinishReason, GenerationRequest, StepRecord, StepTiming
from orchestrator.errors import status_of

if TYPE_CHECKING:
    from orchestrator.fleet import Replica
    from orchestrator.router import Router
    from orchestrator.step_loop import LiveSequence

# A finish reason as OpenAI's API and the GenAI conventions spell it.
FINISH_REASONS = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP: "stop",
                  FinishReason.CONTEXT: "length"}
ROOT = otel_context.Context()  # an empty context: a span started in it is the root of a trace of its own


def policy_label(name: str) -> str:
    """A policy as a metric label: a fixed shape by its family (`tree`, `chain`), so that requests naming ever new
    shapes (`tree:4x5/16`) cannot grow the metrics' series without bound. Spans keep the full name."""
    return name.partition(":")[0]


class RequestTrace:
    """One request's spans beside its server span: the open phase (queue or prefill) and, after a failover, the
    replay span that holds its phases. A request whose span is not recorded costs nothing here."""

    def __init__(self, tracer: trace.Tracer, span: trace.Span) -> None:
        self.tracer = tracer
        self.span = span
        self.recording = span.is_recording()
        self.phase: trace.Span | None = None
        self.phase_name = ""
        self.replay: trace.Span | None = None

    @property
    def link(self) -> Link:
        return Link(self.span.get_span_context())

    def enter(self, name: str, links: Iterable[Link] = (), **attributes) -> None:
        """End the open phase and open `name` (queue, prefill); a phase of that name open already goes on."""
        if not self.recording or (self.phase is not None and self.phase_name == name):
            return
        self._end_phase()
        parent = trace.set_span_in_context(self.replay or self.span)
        self.phase = self.tracer.start_span(name, context=parent, links=list(links), attributes=attributes)
        self.phase_name = name

    def joined(self) -> None:
        """Its prefill is done: it decodes (a replay ends here)."""
        if not self.recording:
            return
        self._end_phase()
        if self.replay is not None:
            self.replay.end()
            self.replay = None

    def replayed(self, source: str, state: str, count: int) -> None:
        """It left verify replica `source` (state: down or draining) to be replayed on another."""
        if not self.recording:
            return
        self.close("left for another replica")
        self.replay = self.tracer.start_span(
            "replay", context=trace.set_span_in_context(self.span),
            attributes={"cast.replay.from": source, "cast.replay.state": state, "cast.replays": count})

    def close(self, error: str | None = None) -> None:
        """End whatever is open (the request finished, failed or went away)."""
        if not self.recording:
            return
        self._end_phase(error)
        if self.replay is not None:
            if error:
                self.replay.set_status(Status(StatusCode.ERROR, error))
            self.replay.end()
            self.replay = None

    def _end_phase(self, error: str | None = None) -> None:
        if self.phase is not None:
            if error:
                self.phase.set_status(Status(StatusCode.ERROR, error))
            self.phase.end()
            self.phase = None


@dataclass
class StepTrace:
    """A traced step: its span (the cost model's predictions are on the step's StepTiming)."""

    span: trace.Span


class OrchestratorTelemetry:
    """The orchestrator's tracer and instruments (no-ops where telemetry is off)."""

    def __init__(self, telemetry: Telemetry | None = None, model: str = "") -> None:
        self.telemetry = telemetry or Telemetry("orchestrator")
        self.tracer = self.telemetry.tracer
        self.model = model  # gen_ai.request.model: the served model's id (the HTTP API's)
        meter = self.telemetry.meter
        self.request_seconds = meter.create_histogram(
            GEN_AI_SERVER_REQUEST_DURATION, unit="s", description="a request from its arrival to its last token",
            explicit_bucket_boundaries_advisory=REQUEST_DURATION_BUCKETS)
        self.first_token_seconds = meter.create_histogram(
            GEN_AI_SERVER_TIME_TO_FIRST_TOKEN, unit="s", description="a request's arrival to its first token",
            explicit_bucket_boundaries_advisory=TIME_TO_FIRST_TOKEN_BUCKETS)
        self.output_token_seconds = meter.create_histogram(
            GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN, unit="s", description="per output token after the first",
            explicit_bucket_boundaries_advisory=TIME_PER_OUTPUT_TOKEN_BUCKETS)
        self.request_tokens = meter.create_histogram(
            "cast.request.tokens", unit="{token}", description="a request's prompt (gen_ai.token.type=input) and "
            "completion (output) tokens: gen_ai.client.token.usage's shape", explicit_bucket_boundaries_advisory=TOKEN_USAGE_BUCKETS)
        self.step_seconds = meter.create_histogram(
            "cast.step.duration", unit="s", description="a decoding step of a verify replica's batch",
            explicit_bucket_boundaries_advisory=STEP_SECONDS_BUCKETS)
        self.draft_seconds = meter.create_histogram(
            "cast.step.draft.duration", unit="s", description="a drafted step's Expand calls (parallel), as waited for",
            explicit_bucket_boundaries_advisory=STEP_SECONDS_BUCKETS)
        self.verify_seconds = meter.create_histogram(
            "cast.step.verify.duration", unit="s", description="a step's Verify call, as waited for",
            explicit_bucket_boundaries_advisory=STEP_SECONDS_BUCKETS)
        self.accepted_tokens = meter.create_histogram(
            "cast.step.accepted_tokens", unit="{token}", description="tokens a sequence committed in a step",
            explicit_bucket_boundaries_advisory=(1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32))
        self.verified_nodes = meter.create_histogram(
            "cast.step.verified_nodes", unit="{node}", description="tree nodes a sequence sent to the verifier in a step",
            explicit_bucket_boundaries_advisory=(1, 2, 4, 8, 16, 32, 64, 128))
        self.replays = meter.create_counter(
            "cast.orchestrator.replays", unit="{sequence}", description="sequences replayed on another verify replica")
        self.gate_switches = meter.create_counter(
            "cast.orchestrator.draft_gate.switches", unit="{switch}",
            description="the draft gate switched a policy at a batch size between its kinds of step (drafting, plain "
                        "decoding; a cascade's: each model level with lookup, lookup alone, plain decoding)")
        for counter in (self.replays, self.gate_switches):
            counter.add(0)  # exported from the start (a counter appears at its first add)

    @property
    def tracing(self) -> bool:
        return self.telemetry.tracing

    def shutdown(self) -> None:
        self.telemetry.shutdown()

    def observe_router(self, router: Router) -> None:
        """Gauges read at each scrape: per verify replica, the sequences live in its batch and waiting for it (those
        that wait for any replica to serve count under replica "")."""

        def live(_) -> list[metrics.Observation]:
            return [metrics.Observation(len(loop.live) + len(loop.joining), {"cast.verify.replica": r.address})
                    for r, loop in list(router.loops.items())]

        def queued(_) -> list[metrics.Observation]:
            return [metrics.Observation(len(router.orphans), {"cast.verify.replica": ""}),
                    *(metrics.Observation(len(loop.waiting), {"cast.verify.replica": r.address})
                      for r, loop in list(router.loops.items()))]

        meter = self.telemetry.meter
        meter.create_observable_gauge("cast.orchestrator.live_sequences", [live], unit="{sequence}",
                                      description="sequences in a verify replica's batch")
        meter.create_observable_gauge("cast.orchestrator.queued_requests", [queued], unit="{request}",
                                      description="requests waiting for a verify replica's batch")

    # --- requests -------------------------------------------------------------------------------------------------

    def request_trace(self, span: trace.Span) -> RequestTrace:
        return RequestTrace(self.tracer, span)

    async def observe(self, chunks: AsyncIterator[Chunk], request: GenerationRequest, operation: str,
                      span: trace.Span, cancel_code: Callable[[], grpc.StatusCode] = lambda: grpc.StatusCode.CANCELLED,
                      ) -> AsyncIterator[Chunk]:
        """A request's chunks as they come, recorded on its server span (GenAI attributes) and in the GenAI metrics.
        A failure is recorded as error.type, the status code's name (cancel_code() says which, when the caller
        went away: CANCELLED, or DEADLINE_EXCEEDED)."""
        labels = {GEN_AI_OPERATION_NAME: operation, GEN_AI_PROVIDER_NAME: PROVIDER, GEN_AI_REQUEST_MODEL: self.model}
        recording = span.is_recording()
        if recording:
            span.set_attributes({
                **labels, GEN_AI_REQUEST_MAX_TOKENS: request.max_new_tokens,
                GEN_AI_REQUEST_TEMPERATURE: request.temperature, GEN_AI_REQUEST_TOP_P: request.top_p,
                GEN_AI_USAGE_INPUT_TOKENS: len(request.prompt_ids), "cast.policy": request.policy.name,
                **({GEN_AI_REQUEST_TOP_K: request.top_k} if request.top_k else {}),
                **({GEN_AI_REQUEST_STOP_SEQUENCES: list(request.stop)} if request.stop else {}),
            })
        start = time.perf_counter()
        first: float | None = None
        final: Chunk | None = None
        error: grpc.StatusCode | None = None
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    if first is None and chunk.token_ids:
                        first = time.perf_counter()
                    final = chunk
                    yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            error = cancel_code()
            raise
        except Exception as exc:
            error = status_of(exc)[0]
            raise
        finally:
            seconds = time.perf_counter() - start
            if error is not None:
                labels[ERROR_TYPE] = error.name
                if recording:
                    span.set_attribute(ERROR_TYPE, error.name)
            self.request_seconds.record(seconds, labels)
            if error is None and final is not None:
                self._succeeded(span, labels, request, final, seconds, None if first is None else first - start)

    def _succeeded(self, span: trace.Span, labels: dict, request: GenerationRequest, final: Chunk, seconds: float,
                   to_first: float | None) -> None:
        output = final.completion_tokens
        self.request_tokens.record(len(request.prompt_ids), {**labels, GEN_AI_TOKEN_TYPE: "input"})
        self.request_tokens.record(output, {**labels, GEN_AI_TOKEN_TYPE: "output"})
        if to_first is not None:
            self.first_token_seconds.record(to_first, labels)
            if output > 1:
                self.output_token_seconds.record((seconds - to_first) / (output - 1), labels)
        if span.is_recording():
            stats = final.stats
            span.set_attributes({
                GEN_AI_RESPONSE_MODEL: self.model, GEN_AI_USAGE_OUTPUT_TOKENS: output,
                GEN_AI_RESPONSE_FINISH_REASONS: [FINISH_REASONS[final.finish_reason]],
                "cast.time_to_first_token_seconds": to_first or 0.0, "cast.steps": len(stats.steps),
                "cast.tokens_per_step": stats.mean_accepted_length, "cast.replays": stats.replays,
                "cast.draft_seconds": stats.draft_seconds, "cast.verify_seconds": stats.verify_seconds,
            })

    # --- batches --------------------------------------------------------------------------------------------------

    def batch_span(self, name: str, sequences: list[LiveSequence], **attributes) -> trace.Span | None:
        """The root span of work that serves `sequences` (a step, a prefill, a release), linked to each traced
        request; None where none of them is traced."""
        if not self.tracing:
            return None
        links = [s.trace.link for s in sequences if s.trace.recording]
        if not links:
            return None
        return self.tracer.start_span(name, context=ROOT, links=links, attributes=attributes)

    def start_step(self, batch: list[LiveSequence], replica: Replica) -> StepTrace | None:
        span = self.batch_span("step", batch, **{"cast.verify.replica": replica.address})
        return StepTrace(span) if span is not None else None

    def step_done(self, step: StepTrace | None, batch: list[LiveSequence], records: list[StepRecord],
                  timing: StepTiming) -> None:
        """A committed step: its metrics, and its span's attributes (batch, policies, the trees, what was accepted,
        predicted and measured costs, replicas)."""
        self.step_seconds.record(timing.step)
        if timing.draft_rpc:
            self.draft_seconds.record(timing.draft_rpc)
        self.verify_seconds.record(timing.verify_rpc)
        for s, record in zip(batch, records):
            policy = {"cast.policy": policy_label(s.policy.name)}
            self.accepted_tokens.record(record.accepted_tokens, policy)
            self.verified_nodes.record(record.verified_nodes, policy)
        if step is None:
            return
        committed = sum(r.accepted_tokens for r in records)
        step.span.set_attributes({
            "cast.step.batch_size": len(batch),
            "cast.step.policy": ",".join(sorted({s.policy.name for s in batch})),
            "cast.step.expanded_nodes": sum(r.expanded_nodes for r in records),
            "cast.step.verified_nodes": sum(r.verified_nodes for r in records),
            "cast.step.depth": max(r.depth for r in records),
            "cast.step.accepted_tokens": committed,
            "cast.step.accepted_length": committed / len(records),
            "cast.step.predicted_ms": timing.predicted_draft_ms + timing.predicted_verify_ms,
            "cast.step.measured_ms": timing.step * 1e3,
            "cast.step.draft.predicted_ms": timing.predicted_draft_ms,
            "cast.step.draft.measured_ms": timing.draft_rpc * 1e3,
            "cast.step.draft.model_ms": timing.draft_model * 1e3,
            "cast.step.verify.predicted_ms": timing.predicted_verify_ms,
            "cast.step.verify.measured_ms": timing.verify_rpc * 1e3,
            "cast.step.verify.model_ms": timing.verify_model * 1e3,
            "cast.step.one_off": timing.one_off,
            "cast.step.arms": sorted({f"{r.arm} ({r.mode})" if r.mode else r.arm for r in records}),
            "cast.draft.replicas": sorted({s.draft.address for s in batch if s.draft is not None}),
        })

    @staticmethod
    def failed(span: trace.Span | None, error: grpc.aio.AioRpcError) -> None:
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, f"{error.code().name}: {error.details()}"))

