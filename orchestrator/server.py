"""Start-up of the orchestrator: tokenizer, the replica fleet, the router, health, reflection, signals."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from transformers import AutoTokenizer

from cast.v1 import generation_pb2, generation_pb2_grpc
from cast_runtime.grpc_options import server_options
from cast_runtime.identity import vocab_hash
from cast_runtime.telemetry import setup_telemetry
from orchestrator.config import OrchestratorConfig
from orchestrator.fleet import Fleet
from orchestrator.http_api import HttpServer, create_app
from orchestrator.policies import make_policies
from orchestrator.requests import RequestBuilder
from orchestrator.router import Router
from orchestrator.servicer import GenerationServicer
from orchestrator.telemetry import OrchestratorTelemetry

log = logging.getLogger("cast.orchestrator")
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
TRACED_METHODS = (f"/{SERVICE_NAME}/Generate", f"/{SERVICE_NAME}/GenerateStream")  # not health, reflection, ListReplicas


async def start_server(config: OrchestratorConfig) -> tuple[grpc.aio.Server, int]:
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_dir)
    fleet = Fleet(config.draft_target, config.verify_target, vocab_hash(tokenizer.get_vocab()), config.refresh_s)
    await fleet.start(config.connect_timeout_s)
    serving = fleet.serving("draft") + fleet.serving("verify")
    max_context = min(r.description.max_context for r in serving)
    model_id = fleet.serving("verify")[0].description.model_name or config.tokenizer_dir.name
    telemetry = setup_telemetry("orchestrator", config.metrics_port, config.host)
    router = Router(fleet, tokenizer, max_context, config.rpc_timeout_s, config.max_live, config.max_queued,
                    telemetry=OrchestratorTelemetry(telemetry, model_id))
    requests = RequestBuilder(tokenizer, max_context, config.max_new_tokens_limit, config.default_policy,
                              make_policies(config.cast))

    server = grpc.aio.server(options=server_options(), interceptors=telemetry.server_interceptors(TRACED_METHODS))
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(router, requests), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    # Bound here, before anything starts: a taken port fails the start-up at once.
    server.http = (HttpServer(create_app(router, requests, model_id), config.host, config.http_port)
                   if config.http_port is not None else None)
    await server.start()
    if server.http is not None:  # before SERVING: a ready orchestrator answers both APIs
        await server.http.start()
        log.info("HTTP API on http://%s:%d (model %r)", config.host, server.http.port, model_id)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    watch = asyncio.get_running_loop().create_task(fleet.watch(), name="fleet-watch")

    async def close() -> None:
        """After the server stopped: release every sequence's sessions, stop watching the fleet."""
        watch.cancel()
        await router.close()
        await fleet.close()
        telemetry.shutdown()

    server.health_servicer = health_servicer  # for graceful shutdown
    server.router = router
    server.close = close
    log.info("orchestrator serving on %s:%d (draft %s, verify %s)", config.host, port, config.draft_target,
             config.verify_target)
    return server, port


async def serve(config: OrchestratorConfig) -> None:
    """Serve until SIGTERM or SIGINT; then report NOT_SERVING, give running requests config.grace_s to finish,
    release their sessions and exit."""
    server, _ = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.health_servicer.enter_graceful_shutdown()
    await asyncio.gather(server.stop(config.grace_s), *([server.http.stop()] if server.http else []))
    await server.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(OrchestratorConfig.from_args(argv)))


if __name__ == "__main__":
    main()
