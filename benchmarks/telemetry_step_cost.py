"""What a decoding step's telemetry costs, in microseconds: the orchestrator's step span (linked to each request of
the batch) with its attributes and metrics, the context injected into the Expand and Verify messages, and the draft
and verify services' message spans with their forward spans, each service with its own tracer provider exporting by
OTLP to benchmarks/otlp_sink.py (a subprocess), as three processes would. Against the same calls with telemetry off.

    .venv/bin/python -m benchmarks.telemetry_step_cost [--steps 2000] [--batches 1,8]

Reports per step: the wall time and CPU time of the calling thread (what a step waits for; wall time includes
waiting for a CPU on a loaded machine) and the process's CPU time, the span processors' export threads and the OTLP
encoding included (what the machine pays).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from types import SimpleNamespace

from opentelemetry import propagate, trace

from cast.v1 import draft_pb2, verify_pb2
from cast_runtime.telemetry import Telemetry
from orchestrator.decoding import StepRecord, StepTiming
from orchestrator.stack import free_ports
from orchestrator.telemetry import OrchestratorTelemetry

EXPAND, VERIFY = "/cast.v1.DraftService/Expand", "/cast.v1.VerifyService/Verify"


def telemetry(service: str, on: bool, sink: str) -> Telemetry:
    if not on:
        return Telemetry(service)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from prometheus_client import CollectorRegistry

    resource = Resource({"service.name": f"cast-{service}"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=sink, insecure=True)))
    meter_provider = MeterProvider(resource=resource,
                                   metric_readers=[PrometheusMetricReader(registry=CollectorRegistry())])
    return Telemetry(service, tracer_provider, meter_provider)


def one_step(orch: OrchestratorTelemetry, draft: Telemetry, verify: Telemetry, batch: list, records: list,
             replica) -> None:
    """The telemetry calls of one step, in the order the step loop and the services make them."""
    step = orch.start_step(batch, replica)
    with trace.use_span(step.span, end_on_exit=True) if step else _nothing():
        expand, verify_request = draft_pb2.ExpandRequest(), verify_pb2.VerifyRequest()
        propagate.inject(expand.trace_context)
        with draft.message_span(EXPAND, expand.trace_context, {"cast.sequences": len(batch)}):
            draft.record_forward("draft.forward", "expand", 0.01, time.time_ns(), {"cast.forward.sequences": len(batch)})
        propagate.inject(verify_request.trace_context)
        with verify.message_span(VERIFY, verify_request.trace_context, {"cast.sequences": len(batch)}):
            verify.record_forward("verify.forward", "verify", 0.02, time.time_ns(),
                                  {"cast.forward.sequences": len(batch)})
        orch.step_done(step, batch, records, StepTiming(0.03, 0.011, 0.01, 0.021, 0.02, predicted_draft_ms=10.0,
                                                        predicted_verify_ms=20.0))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def measure(on: bool, size: int, steps: int, sink: str) -> tuple[float, float, float]:
    """µs per step: wall time and CPU time of the calling thread, and the process's CPU (export threads included)."""
    orch = OrchestratorTelemetry(telemetry("orchestrator", on, sink), "target")
    draft, verify = telemetry("draft", on, sink), telemetry("verify", on, sink)
    requests = [orch.tracer.start_span("/cast.v1.GenerationService/Generate") for _ in range(size)]
    batch = [SimpleNamespace(trace=orch.request_trace(span), policy=SimpleNamespace(name="cast"),
                             draft=SimpleNamespace(address="127.0.0.1:50052")) for span in requests]
    records = [StepRecord(expanded_nodes=40, verified_nodes=16, depth=4, accepted_tokens=4) for _ in batch]
    replica = SimpleNamespace(address="127.0.0.1:50053")
    for _ in range(200):  # warm up
        one_step(orch, draft, verify, batch, records, replica)
    for t in (orch.telemetry, draft, verify):
        if t.tracer_provider:
            t.tracer_provider.force_flush()
    cpu, wall, thread = time.process_time(), time.perf_counter(), time.thread_time()
    for _ in range(steps):
        one_step(orch, draft, verify, batch, records, replica)
    wall, thread = time.perf_counter() - wall, time.thread_time() - thread
    for t in (orch.telemetry, draft, verify):  # the exports of these steps count as their CPU
        if t.tracer_provider:
            t.tracer_provider.force_flush()
    cpu = time.process_time() - cpu
    for span in requests:
        span.end()
    for t in (orch.telemetry, draft, verify):
        t.shutdown()
    return wall / steps * 1e6, thread / steps * 1e6, cpu / steps * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=3, help="off and on alternate this many times; the medians count")
    a = p.parse_args()
    (port,) = free_ports(1)
    sink = subprocess.Popen([sys.executable, "-m", "benchmarks.otlp_sink", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        sink.stdout.readline()  # "otlp sink on ..."
        print(f"# {time.strftime('%Y-%m-%d %H:%M')} {os.uname().nodename}, {os.cpu_count()} CPUs, "
              f"{a.steps} steps per run, medians of {a.rounds} alternating runs")
        print("batch  telemetry  wall_us  thread_cpu_us  process_cpu_us   (per step)")
        for size in map(int, a.batches.split(",")):
            runs = {False: [], True: []}
            for _ in range(a.rounds):
                for on in (False, True):
                    runs[on].append(measure(on, size, a.steps, f"http://127.0.0.1:{port}"))
            for on in (False, True):
                wall, thread, cpu = (sorted(r[i] for r in runs[on])[len(runs[on]) // 2] for i in range(3))
                print(f"{size:5d}  {'on' if on else 'off':9s}  {wall:7.1f}  {thread:13.1f}  {cpu:14.1f}")
    finally:
        sink.terminate()
        print("# sink:", sink.communicate(timeout=10)[0].strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
