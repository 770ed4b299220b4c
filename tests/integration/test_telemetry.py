"""Telemetry across the three services, each a real process on loopback: one trace per request, sent by OTLP to a
TraceService that the test runs (opentelemetry-proto's service definitions), and each service's Prometheus endpoint.

The design (orchestrator/telemetry.py): a request's trace holds its server span with the GenAI attributes and its
queue and prefill spans; each decoding step is a trace of its own, linked to the requests it served, and the draft
and verify services' Expand and Verify spans are children of the step's span, the model forwards theirs. With
propagation switched off (OTEL_PROPAGATORS=none) the services' spans lose their parents: the same check fails.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections import defaultdict
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client.parser import text_string_to_metric_families

from cast.v1 import generation_pb2, generation_pb2_grpc
from orchestrator.cli import cmd_generate
from orchestrator.stack import free_ports
from tests.integration.stacks import start_stack

GENERATE = "/cast.v1.GenerationService/Generate"
PROMPT = "def fibonacci(n):"
NEW_TOKENS = 24


@dataclass
class Span:
    service: str
    proto: trace_pb2.Span

    @property
    def name(self) -> str:
        return self.proto.name

    @property
    def trace_id(self) -> str:
        return self.proto.trace_id.hex()

    @property
    def id(self) -> str:
        return self.proto.span_id.hex()

    @property
    def parent(self) -> str:
        return self.proto.parent_span_id.hex()

    @property
    def links(self) -> set[tuple[str, str]]:
        return {(link.trace_id.hex(), link.span_id.hex()) for link in self.proto.links}

    @property
    def attributes(self) -> dict:
        out = {}
        for kv in self.proto.attributes:
            value = getattr(kv.value, kv.value.WhichOneof("value"))
            out[kv.key] = [getattr(v, v.WhichOneof("value")) for v in value.values] if kv.value.HasField(
                "array_value") else value
        return out


class Receiver(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """An OTLP receiver: keeps every span exported to it (metrics it accepts and drops)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
            return metrics_service_pb2.ExportMetricsServiceResponse()
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(kv.value.string_value for kv in resource_spans.resource.attributes
                               if kv.key == "service.name")
                for scope in resource_spans.scope_spans:
                    self.spans += [Span(service, span) for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)


class TracedStack:
    """The three services exporting to a Receiver of their own, with their Prometheus endpoints on."""

    def __init__(self, tiny_pair, log_dir, propagation: str) -> None:
        self.receiver = Receiver()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self.receiver, self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self.receiver, self.server)
        otlp_port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.metrics = dict(zip(("orchestrator", "draft", "verify"), free_ports(3)))
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}", "OTEL_BSP_SCHEDULE_DELAY": "50",
               "OTEL_PROPAGATORS": propagation}
        target, draft = tiny_pair
        try:
            self.stack = start_stack(
                target, draft, log_dir, env=env,
                orchestrator_args=["--metrics-port", str(self.metrics["orchestrator"])],
                draft_args=["--metrics-port", str(self.metrics["draft"])],
                verify_args=["--metrics-port", str(self.metrics["verify"])])
        except BaseException:
            self.server.stop(0)
            raise
        self.channel = grpc.insecure_channel(self.stack.spec.address)
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.stack.stop()
        self.server.stop(0)

    def spans_until(self, ready, timeout_s: float = 15.0) -> list[Span]:
        """The spans received once ready(spans) holds (or after timeout_s: the check then says what is missing)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.receiver.snapshot()
            if ready(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)


@pytest.fixture(scope="module")
def stacks(tiny_pair, tmp_path_factory):
    running: dict[str, TracedStack] = {}

    def get(propagation: str) -> TracedStack:
        if propagation not in running:
            running[propagation] = TracedStack(tiny_pair, tmp_path_factory.mktemp(f"logs-{propagation}"), propagation)
        return running[propagation]

    yield get
    for stack in running.values():
        stack.close()


def generate(stub, **kw) -> generation_pb2.GenerateResponse:
    return stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=NEW_TOKENS, policy="cast",
                                                        ignore_eos=True, **kw), timeout=60)


def check_request_trace(spans: list[Span], response: generation_pb2.GenerateResponse, verify_address: str) -> None:
    """The checks a user's look at one request makes (see the module docstring)."""
    by_trace: dict[str, list[Span]] = defaultdict(list)
    for s in spans:
        by_trace[s.trace_id].append(s)

    # The request's own trace: its server span with the GenAI attributes, and its queue and prefill spans under it.
    request = by_trace[response.trace_id]
    (server,) = [s for s in request if s.name == GENERATE]
    assert server.service == "cast-orchestrator" and server.proto.kind == trace_pb2.Span.SPAN_KIND_SERVER
    a = server.attributes
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.provider.name"] == "cast_serve"
    assert a["gen_ai.request.model"] == "target" == a["gen_ai.response.model"]
    assert a["gen_ai.request.max_tokens"] == NEW_TOKENS
    assert a["gen_ai.request.temperature"] == 0 and a["gen_ai.request.top_p"] == 1
    assert a["gen_ai.usage.input_tokens"] == response.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == response.usage.completion_tokens == NEW_TOKENS
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["rpc.grpc.status_code"] == 0
    phases = {s.name: s for s in request if s.parent == server.id}
    assert {"queue", "prefill"} <= set(phases), f"the request's trace has {sorted(s.name for s in request)}"

    # Its steps: one linked span per step, with the step's attributes; their accepted tokens are its output.
    steps = [s for s in spans if s.name == "step" and (server.trace_id, server.id) in s.links]
    assert len(steps) == response.stats.steps
    assert sum(s.attributes["cast.step.accepted_tokens"] for s in steps) == NEW_TOKENS
    for step in steps:
        a = step.attributes
        assert step.parent == "" and a["cast.step.batch_size"] == 1 and a["cast.step.policy"] == "cast"
        assert a["cast.step.verified_nodes"] >= 1 and a["cast.step.expanded_nodes"] >= 1 and a["cast.step.depth"] >= 0
        assert a["cast.step.accepted_length"] == a["cast.step.accepted_tokens"] >= 1
        assert a["cast.step.measured_ms"] > 0 and a["cast.step.predicted_ms"] > 0
        assert a["cast.step.verify.predicted_ms"] > 0 and a["cast.step.verify.measured_ms"] > 0
        assert a["cast.verify.replica"] == verify_address
        assert list(a["cast.step.arms"]) in (["drafted"], ["plain"])  # the gate's choice (StepStats.arm)
        assert a["cast.step.arms"] == ["plain"] or a["cast.step.expanded_nodes"] > 1

    # The services' spans are children of the step's span, in its trace: Verify every step, Expand where it drafted.
    drafted = 0
    for step in steps:
        children = [s for s in by_trace[step.trace_id] if s.parent == step.id]
        verify = [s for s in children if s.name == "/cast.v1.VerifyService/Verify"]
        assert len(verify) == 1 and verify[0].service == "cast-verify", \
            f"the verify service's Verify span is not a child of the step span {step.id}"
        expand = [s for s in children if s.name == "/cast.v1.DraftService/Expand"]
        if step.attributes["cast.step.expanded_nodes"] > 1:
            assert len(expand) == 1 and expand[0].service == "cast-draft", \
                f"the draft service's Expand span is not a child of the step span {step.id}"
            assert step.attributes["cast.draft.replicas"]
            drafted += 1
        for call, forward in ((verify, "verify.forward"), (expand, "draft.forward")):
            for s in call:
                (child,) = [f for f in by_trace[step.trace_id] if f.parent == s.id]
                assert child.name == forward and child.attributes["cast.forward.device_seconds"] > 0
    assert drafted, "no step drafted"

    # The prompt's Prefill: a batch span linked to the request (and its prefill span linked back), the verify
    # service's Prefill span its child, the forward under that.
    (batch,) = [s for s in spans if s.name == "prefill" and s.parent == "" and (server.trace_id, server.id) in s.links]
    assert (batch.trace_id, batch.id) in phases["prefill"].links
    (prefill,) = [s for s in by_trace[batch.trace_id] if s.name == "/cast.v1.VerifyService/Prefill"]
    assert prefill.parent == batch.id, "the verify service's Prefill span is not a child of the prefill span"
    assert [s.name for s in by_trace[batch.trace_id] if s.parent == prefill.id] == ["verify.prefill_forward"]

    # The sessions' release: both services' Release spans under the orchestrator's release span.
    (release,) = [s for s in spans if s.name == "release" and (server.trace_id, server.id) in s.links]
    released = sorted(s.service for s in by_trace[release.trace_id] if s.parent == release.id)
    assert released == ["cast-draft", "cast-verify"], "the services' Release spans are not children of the release span"


def request_is_complete(trace_id: str):
    """Whether the spans of the request with this trace id have arrived, the last of them (its release) included."""
    def ready(spans: list[Span]) -> bool:
        server = [s for s in spans if s.trace_id == trace_id and s.name == GENERATE]
        release = [s for s in spans if s.name == "release" and server and (trace_id, server[0].id) in s.links]
        return bool(release) and sum(1 for s in spans if s.trace_id == release[0].trace_id) >= 3
    return ready


@pytest.mark.slow
@pytest.mark.parametrize("propagation", ["tracecontext", "none"])
def test_one_request_is_one_trace_across_the_services(stacks, propagation):
    stack = stacks(propagation)
    response = generate(stack.stub)
    assert len(response.trace_id) == 32
    spans = stack.spans_until(request_is_complete(response.trace_id), timeout_s=15 if propagation != "none" else 3)
    verify_address = stack.stack.spec.replica_addresses("verify")["verify"]
    if propagation == "none":
        # The orchestrator's spans are all there, but nothing tells the services which step a message belongs to.
        with pytest.raises(AssertionError, match="not a child of the step span"):
            check_request_trace(spans, response, verify_address)
    else:
        check_request_trace(spans, response, verify_address)


@pytest.mark.slow
def test_failing_calls_record_their_status(stacks):
    stack = stacks("tracecontext")
    with pytest.raises(grpc.RpcError) as bad:
        generate(stack.stub, temperature=-1)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as late:  # far more tokens than a tenth of a second decodes
        stack.stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=900, ignore_eos=True),
                            timeout=0.1)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def statuses(spans: list[Span]) -> dict[int, Span]:
        return {s.attributes.get("rpc.grpc.status_code"): s for s in spans if s.name == GENERATE}

    spans = stack.spans_until(lambda spans: {3, 4} <= set(statuses(spans)))
    by_code = statuses(spans)
    invalid, deadline = by_code.get(3), by_code.get(4)
    assert invalid is not None, "no Generate span with INVALID_ARGUMENT (3)"
    assert invalid.proto.status.code == trace_pb2.Status.STATUS_CODE_UNSET  # the caller's error: not the server's
    assert deadline is not None, "no Generate span with DEADLINE_EXCEEDED (4)"
    assert deadline.proto.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert deadline.attributes["error.type"] == "DEADLINE_EXCEEDED"


@pytest.mark.slow
def test_cast_generate_json_names_the_trace(stacks, capsys):
    stack = stacks("tracecontext")
    assert cmd_generate(["--addr", stack.stack.spec.address, "--json", "--max-new-tokens", "8", PROMPT]) == 0
    printed = capsys.readouterr().out
    trace_id = next(line.split('"')[3] for line in printed.splitlines() if '"trace_id"' in line)
    spans = stack.spans_until(lambda spans: any(s.trace_id == trace_id and s.name == GENERATE for s in spans))
    assert any(s.trace_id == trace_id and s.name == GENERATE for s in spans)


def scrape(port: int) -> dict[str, list]:
    """{metric family name: its samples} from a service's /metrics, read with prometheus_client's parser."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(families: dict[str, list], name: str, **labels) -> float:
    """The sum of the samples called `name` (a family's, or one of a histogram's: NAME_count) with these labels."""
    family = families[re.sub(r"_(count|sum|total|bucket)$", "", name)]
    return sum(s.value for s in family if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.slow
def test_every_service_serves_its_metrics(stacks):
    stack = stacks("tracecontext")
    for _ in range(2):
        generate(stack.stub)
    stack.stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=8, policy="tree:2x3/4",
                                                       ignore_eos=True), timeout=60)
    # While a request runs, the load gauges count it: its sequence is live, with a session on each service.
    stream = stack.stub.GenerateStream(generation_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=900,
                                                                       policy="eagle2", ignore_eos=True), timeout=60)
    next(stream), next(stream)  # its first step (a plain one) and a drafted one: it holds a draft session too
    orchestrator, draft, verify = (scrape(stack.metrics[name]) for name in ("orchestrator", "draft", "verify"))
    stream.cancel()

    for histogram in ("gen_ai_server_request_duration_seconds", "gen_ai_server_time_to_first_token_seconds",
                      "gen_ai_server_time_per_output_token_seconds", "cast_step_duration_seconds",
                      "cast_step_draft_duration_seconds", "cast_step_verify_duration_seconds"):
        assert value(orchestrator, histogram + "_count") >= 2, histogram
    assert value(orchestrator, "gen_ai_server_request_duration_seconds_count", gen_ai_operation_name="text_completion",
                 gen_ai_request_model="target") >= 2
    assert value(orchestrator, "cast_request_tokens_count", gen_ai_token_type="input") >= 2
    assert value(orchestrator, "cast_request_tokens_sum", gen_ai_token_type="output") >= 2 * NEW_TOKENS
    assert value(orchestrator, "cast_step_accepted_tokens_sum", cast_policy="cast") >= 2 * NEW_TOKENS
    assert value(orchestrator, "cast_step_verified_nodes_count", cast_policy="cast") >= 2
    # A fixed shape counts under its family: requests naming new shapes add no series.
    assert value(orchestrator, "cast_step_verified_nodes_count", cast_policy="tree") >= 1
    assert not any(":" in s.labels.get("cast_policy", "") for f in orchestrator.values() for s in f)
    assert value(orchestrator, "cast_orchestrator_live_sequences") == 1
    assert value(orchestrator, "cast_orchestrator_queued_requests") == 0
    assert value(orchestrator, "cast_orchestrator_replays_total") == 0  # exported before the first replay
    assert "cast_orchestrator_draft_gate_switches" in orchestrator
    for service, families in (("draft", draft), ("verify", verify)):
        assert value(families, f"cast_{service}_sessions") == 1, service
        assert value(families, f"cast_{service}_slots") >= 1, service
    assert value(verify, "cast_verify_batch_occupancy") == 1 / value(verify, "cast_verify_slots")
    assert value(draft, "cast_forward_duration_seconds_count", cast_forward_kind="expand") > 0
    assert value(verify, "cast_forward_duration_seconds_count", cast_forward_kind="verify") > 0
    assert value(verify, "cast_forward_duration_seconds_count", cast_forward_kind="prefill") >= 3
