"""An OTLP gRPC receiver that counts what it gets and keeps nothing: the far end of the telemetry benchmarks
(a collector's place, without a collector's own CPU cost).

    .venv/bin/python -m benchmarks.otlp_sink --port 4317    # prints the counts when stopped (SIGTERM, Ctrl-C)
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.spans = self.metric_exports = 0
        self.lock = threading.Lock()

    def Export(self, request, context):
        if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
            with self.lock:
                self.metric_exports += 1
            return metrics_service_pb2.ExportMetricsServiceResponse()
        n = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with self.lock:
            self.spans += n
        return trace_service_pb2.ExportTraceServiceResponse()


def serve(port: int) -> tuple[grpc.Server, Sink, int]:
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(sink, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, sink, port


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=4317)
    a = p.parse_args()
    server, sink, port = serve(a.port)
    print(f"otlp sink on 127.0.0.1:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(0)
    print(f"spans {sink.spans} metric_exports {sink.metric_exports}", flush=True)


if __name__ == "__main__":
    main()
