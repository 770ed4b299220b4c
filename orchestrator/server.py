"""Start-up of the orchestrator: tokenizer, the replica fleet, the router, the gRPC (and HTTP) API, signals."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from transformers import AutoTokenizer

from cast.v1 import generation_pb2, generation_pb2_grpc
from cast_runtime import serving
from cast_runtime.identity import vocab_hash
from cast_runtime.telemetry import setup_telemetry
from orchestrator.auth import AuthInterceptor, ClientLimits, http_authorizer
from orchestrator.config import OrchestratorConfig
from orchestrator.fleet import Fleet
from orchestrator.http_api import HttpServer, allow_all, create_app
from orchestrator.policies import make_policies
from orchestrator.requests import RequestBuilder
from orchestrator.router import Router
from orchestrator.servicer import GenerationServicer
from orchestrator.telemetry import OrchestratorTelemetry

log = logging.getLogger("cast.orchestrator")
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
TRACED_METHODS = (f"/{SERVICE_NAME}/Generate", f"/{SERVICE_NAME}/GenerateStream")  # not health, reflection, ListReplicas


@dataclass
class Running:
    grpc: serving.GrpcServer
    http: HttpServer | None
    router: Router
    watch: asyncio.Task  # the fleet's DNS and health refresh

    async def stop(self, grace_s: float | None) -> None:
        """Stop the gRPC API (running calls get grace_s)."""
        await self.grpc.server.stop(grace_s)

    async def close(self) -> None:
        """After the APIs stopped: release every sequence's sessions, stop watching the fleet."""
        self.watch.cancel()
        await self.router.close()
        await self.router.fleet.close()
        self.router.telemetry.shutdown()


async def start(config: OrchestratorConfig) -> Running:
    telemetry = setup_telemetry("orchestrator", config.metrics_port or None, config.host)
    interceptors = [AuthInterceptor(config.tokens)] if config.tokens is not None else []
    server = serving.GrpcServer(SERVICE_NAME, config.host, config.port, tls=config.tls,
                                interceptors=[*interceptors, *telemetry.server_interceptors(TRACED_METHODS)])
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_dir)
    fleet = Fleet(config.draft_target, config.verify_target, vocab_hash(tokenizer.get_vocab()), config.refresh_s,
                  credentials=config.replica_credentials)
    await fleet.start(config.connect_timeout_s)
    serving_replicas = fleet.serving("draft") + fleet.serving("verify")
    max_context = min(r.description.max_context for r in serving_replicas)
    model_id = fleet.serving("verify")[0].description.model_name or config.tokenizer_dir.name
    router = Router(fleet, tokenizer, max_context, config.rpc_timeout_s, config.max_live, config.max_queued,
                    telemetry=OrchestratorTelemetry(telemetry, model_id), pipeline=config.pipeline)
    requests = RequestBuilder(tokenizer, max_context, config.max_new_tokens_limit, config.default_policy,
                              make_policies(config.cast))
    limits = ClientLimits(config.client_max_live, config.client_max_queued)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(router, requests, limits),
                                                                server.server)
    # Bound here, before anything starts: a taken port fails the start-up at once.
    authorize = http_authorizer(config.tokens) if config.tokens is not None else allow_all
    http = (HttpServer(create_app(router, requests, model_id, authorize, limits), config.host, config.http_port,
                       tls=config.tls) if config.http_port is not None else None)
    if http is not None:  # before SERVING: a ready orchestrator answers both APIs
        await http.start()
        log.info("HTTP API on http%s://%s:%d (model %r)", "s" if config.tls else "", config.host, http.port, model_id)
    await server.start()
    watch = asyncio.get_running_loop().create_task(fleet.watch(), name="fleet-watch")
    log.info("orchestrator serving on %s (draft %s, verify %s)", server.address, config.draft_target,
             config.verify_target)
    return Running(server, http, router, watch)


async def start_server(config: OrchestratorConfig) -> tuple[Running, int]:
    """Start serving; returns the running orchestrator and its gRPC port (config.port may be 0)."""
    running = await start(config)
    return running, running.grpc.port


async def serve(config: OrchestratorConfig) -> None:
    """Serve until SIGTERM or SIGINT; then report NOT_SERVING, give running requests config.grace_s to finish,
    release their sessions and exit."""
    running = await start(config)
    await serving.wait_for_signal()
    await asyncio.gather(running.grpc.drain_and_stop(config.grace_s),
                         *([running.http.stop()] if running.http else []))
    await running.close()


def main(argv: list[str] | None = None) -> None:
    serving.run(serve, OrchestratorConfig.from_args(argv))


if __name__ == "__main__":
    main()
