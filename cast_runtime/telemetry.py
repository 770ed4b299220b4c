"""OpenTelemetry for the three services: one set-up (traces, metrics, the Prometheus scrape endpoint), the GenAI
semantic-convention names, and the spans of messages on the step streams.

Configuration is the standard OTEL_* environment:
- Traces go where OTEL_TRACES_EXPORTER says (otlp, console, none; a comma-separated list). Unset: otlp where
  OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set, else none. With none there is no tracer
  provider at all: no spans, no trace ids, nothing to pay. The sampler is OTEL_TRACES_SAMPLER and its argument
  (default parentbased_always_on); the service is named by OTEL_SERVICE_NAME, else cast-<service>; resource
  attributes come from OTEL_RESOURCE_ATTRIBUTES; propagation is OTEL_PROPAGATORS (tracecontext,baggage; `none`
  switches it off). OTEL_SDK_DISABLED=true turns everything off.
- Metrics: `--metrics-port` serves them for Prometheus at /metrics (off when 0 or absent); they also go by OTLP where
  OTEL_METRICS_EXPORTER says otlp, or is unset while an OTLP endpoint is set.

Unary calls carry their trace context in gRPC metadata, and the stock server interceptor
(opentelemetry-instrumentation-grpc) opens their server spans. A message on a long-lived step stream (ExpandStream,
VerifyStream) is a call of its own but has no metadata: it carries the context of the orchestrator's step in its
`trace_context` field, and message_span() opens its server span. (The stock interceptor would give a whole stream one
span, ended only when the stream ends.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.propagators import textmap
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, Status, StatusCode

log = logging.getLogger("cast.telemetry")

# --- names ----------------------------------------------------------------------------------------------------------

# OpenTelemetry semantic conventions for generative AI (status: development), as of semconv v1.41.0: the names that
# OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental selects. The Python package's constants for them are
# deprecated (they moved to the GenAI conventions' own repository), hence the project's own.
GEN_AI_SEMCONV_VERSION = "1.41.0"
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"            # text_completion (Generate, /v1/completions) or chat
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_REQUEST_STOP_SEQUENCES = "gen_ai.request.stop_sequences"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"                    # input or output
ERROR_TYPE = "error.type"
PROVIDER = "cast_serve"  # gen_ai.provider.name: no well-known value fits a self-hosted server

# Metrics of the conventions, with their units and bucket boundaries.
GEN_AI_SERVER_REQUEST_DURATION = "gen_ai.server.request.duration"
GEN_AI_SERVER_TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"
GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN = "gen_ai.server.time_per_output_token"
REQUEST_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0)
TIME_PER_OUTPUT_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_USAGE_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
# The project's own latency histograms (a step's parts, a model forward): from 0.5 ms to 5 s.
STEP_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

# Attributes of RPC spans (the stock instrumentation's names, so that both kinds of server span read alike).
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
# A server span's status is ERROR only for these codes (the gRPC conventions; the stock interceptor does the same):
# the others are the caller's doing, recorded in rpc.grpc.status_code alone.
SERVER_ERRORS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
                 grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS}


# --- the set-up -----------------------------------------------------------------------------------------------------

@dataclass
class Telemetry:
    """A service's tracer and meter (no-ops where off), and what must be shut down with the service."""

    service: str                       # orchestrator, draft or verify
    tracer_provider: object = None     # opentelemetry.sdk.trace.TracerProvider, or None: tracing off
    meter_provider: object = None      # opentelemetry.sdk.metrics.MeterProvider, or None: metrics off
    metrics_server: object = None      # the Prometheus endpoint's HTTP server
    metrics_port: int | None = None    # ... and its port
    tracer: trace.Tracer = field(init=False)
    meter: metrics.Meter = field(init=False)

    def __post_init__(self) -> None:
        self.tracer = self.tracer_provider.get_tracer("cast_serve") if self.tracer_provider else trace.NoOpTracer()
        self.meter = self.meter_provider.get_meter("cast_serve") if self.meter_provider else metrics.NoOpMeter("")
        self.forward_seconds = self.meter.create_histogram(
            "cast.forward.duration", unit="s", description="a model call of the service (cast.forward.kind)",
            explicit_bucket_boundaries_advisory=STEP_SECONDS_BUCKETS)

    @property
    def tracing(self) -> bool:
        return self.tracer_provider is not None

    def server_interceptors(self, methods: Iterable[str]) -> list:
        """The stock aio server interceptor for these full method names (/cast.v1.VerifyService/Prefill): health
        checks, reflection and the step streams are not among them. None where tracing is off."""
        if not self.tracing:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        return [aio_server_interceptor(tracer_provider=self.tracer_provider,
                                       filter_=filters.any_of(*map(filters.full_method_name, methods)))]

    @contextmanager
    def message_span(self, method: str, carrier: Mapping[str, str],
                     attributes: dict | None = None) -> Iterator[trace.Span]:
        """The SERVER span of one message on a step stream, a child of the context it carries (`method` as
        /pkg.Service/Method). A message that carries none was sent by a caller that does not trace it: no span."""
        if not self.tracing or not carrier:
            yield trace.INVALID_SPAN
            return
        service, _, name = method.lstrip("/").partition("/")
        with self.tracer.start_as_current_span(
            method, context=propagate.extract(carrier), kind=SpanKind.SERVER,
            attributes={RPC_SYSTEM: "grpc", RPC_SERVICE: service, RPC_METHOD: name, RPC_GRPC_STATUS_CODE: 0,
                        **(attributes or {})},
        ) as span:
            yield span

    def record_forward(self, name: str, kind: str, seconds: float, end_ns: int, attributes: dict) -> None:
        """A model call that took `seconds` (the service's own measure, device synchronised) and ended at `end_ns`:
        a finished child span of the current span, and a sample of cast.forward.duration."""
        self.forward_seconds.record(seconds, {"cast.forward.kind": kind})
        parent = trace.get_current_span()
        if parent.is_recording():
            span = self.tracer.start_span(name, start_time=end_ns - int(seconds * 1e9),
                                          attributes={"cast.forward.kind": kind,
                                                      "cast.forward.device_seconds": seconds, **attributes})
            span.end(end_time=end_ns)

    def observe_sessions(self, held: Callable[[], int], slots: int, occupancy: bool = False) -> None:
        """Gauges of the sequences the service holds: cast.<service>.sessions and .slots, and where `occupancy`,
        cast.<service>.batch_occupancy = sessions / slots (read at each scrape, from the scraping thread)."""
        prefix = f"cast.{self.service}"
        self.meter.create_observable_gauge(f"{prefix}.sessions", [lambda _: [metrics.Observation(held())]],
                                           unit="{sequence}", description="sequences (KV caches) held")
        self.meter.create_observable_gauge(f"{prefix}.slots", [lambda _: [metrics.Observation(slots)]],
                                           unit="{sequence}", description="sequences it can hold at most")
        if occupancy:
            self.meter.create_observable_gauge(
                f"{prefix}.batch_occupancy", [lambda _: [metrics.Observation(held() / max(slots, 1))]], unit="1",
                description="sessions / slots: the share of the batch's slots taken")

    def shutdown(self) -> None:
        """Export what is buffered and stop (at the service's exit)."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()


def setup_telemetry(service: str, metrics_port: int | None = None, host: str = "127.0.0.1") -> Telemetry:
    """The service's telemetry from the OTEL_* environment and its --metrics-port (module docstring). No global
    provider is set: several services may share one process (tests)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return Telemetry(service)
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if _names("OTEL_PROPAGATORS", "tracecontext,baggage") == ["none"]:
        propagate.set_global_textmap(NoPropagation())
    resource = service_resource(service)
    tracer_provider = None
    exporters = span_exporters()
    if exporters:
        tracer_provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER
        for exporter in exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    readers, server, port = [], None, None
    if metrics_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

        registry = CollectorRegistry()  # the process's own, not the library's global one
        ProcessCollector(registry=registry)
        readers.append(PrometheusMetricReader(registry=registry))
        server, _ = start_http_server(metrics_port, host, registry=registry)
        port = server.server_port
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
    if "otlp" in _names("OTEL_METRICS_EXPORTER", "otlp" if _otlp_endpoint("METRICS") else "none"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers) if readers else None
    return Telemetry(service, tracer_provider, meter_provider, server, port)


class NoPropagation(textmap.TextMapPropagator):
    """What OTEL_PROPAGATORS=none asks for: nothing sent, nothing read. (The SDK's own empty CompositePropagator
    extracts None rather than a context, and the stock gRPC server interceptor then fails every call.)"""

    def extract(self, carrier, context=None, getter=textmap.default_getter):
        return context if context is not None else otel_context.Context()

    def inject(self, carrier, context=None, setter=textmap.default_setter) -> None:
        pass

    @property
    def fields(self) -> set[str]:
        return set()


def service_resource(service: str):
    """The resource from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; named cast-<service> where they name none."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: f"cast-{service}"}))
    return resource


def span_exporters() -> list:
    exporters = []
    for name in _names("OTEL_TRACES_EXPORTER", "otlp" if _otlp_endpoint("TRACES") else "none"):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter(formatter=span_line))
        elif name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER: {name!r} is not one of otlp, console, none")
    return exporters


def _names(variable: str, default: str) -> list[str]:
    return [n.strip().lower() for n in (os.environ.get(variable) or default).split(",") if n.strip()]


def _otlp_endpoint(signal: str) -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))


# --- helpers --------------------------------------------------------------------------------------------------------

def trace_metadata() -> tuple[tuple[str, str], ...] | None:
    """The current trace context as gRPC metadata for a unary call (None where there is none to send)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items()) or None


def set_rpc_status(span: trace.Span, code: grpc.StatusCode, details: str = "") -> None:
    """Record a call's status on its server span, as the stock interceptor does for an abort."""
    span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
    if code in SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))


def cancellation_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status of a call whose handler was cancelled: DEADLINE_EXCEEDED where its deadline has passed, else
    CANCELLED (the client went away). The stock interceptor records neither."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


def trace_id(span: trace.Span) -> str:
    """The span's trace id as 32 hex digits, or "" where it has none (tracing off)."""
    context = span.get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else ""


def span_line(span: ReadableSpan) -> str:
    """One line per span for `--trace console` (tools/span_tree.py draws a trace's tree from such lines):
    span SERVICE NAME trace=T id=S parent=P|- DURATION ms status=S [links=T/S,...] key=value ..."""
    context, parent = span.context, span.parent
    fields = [
        "span", str(span.resource.attributes.get("service.name", "?")), span.name.replace(" ", "_"),
        f"trace={trace.format_trace_id(context.trace_id)}", f"id={trace.format_span_id(context.span_id)}",
        f"parent={trace.format_span_id(parent.span_id) if parent else '-'}",
        f"{((span.end_time or span.start_time) - span.start_time) / 1e6:.3f}ms",
        f"status={span.status.status_code.name}",
    ]
    if span.links:
        fields.append("links=" + ",".join(f"{trace.format_trace_id(link.context.trace_id)}/"
                                          f"{trace.format_span_id(link.context.span_id)}" for link in span.links))
    for key, value in (span.attributes or {}).items():
        text = ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value)
        fields.append(f"{key}={text.replace(' ', '_')}")
    return " ".join(fields) + "\n"
