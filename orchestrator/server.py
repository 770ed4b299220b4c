"""Start-up of the orchestrator: tokenizer, channels to the draft and verify replicas, health, reflection, signals."""

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
from cast_runtime.wire import cost_table_from_proto
from orchestrator.clients import DraftClient, VerifyClient
from orchestrator.config import OrchestratorConfig
from orchestrator.costs import CostModel
from orchestrator.http_api import HttpServer, create_app
from orchestrator.policies import make_policies
from orchestrator.requests import RequestBuilder
from orchestrator.servicer import GenerationServicer
from orchestrator.step_loop import StepLoop

log = logging.getLogger("cast.orchestrator")
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


async def wait_for_replica(client, timeout_s: float):
    """Describe the replica, retrying while it starts (model loading can take minutes)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await client.describe(timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{client.address} did not answer Describe in {timeout_s:.0f} s: {exc.details()}") from exc
            await asyncio.sleep(0.5)


async def start_server(config: OrchestratorConfig) -> tuple[grpc.aio.Server, int]:
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_dir)
    # One replica of each for now; routing across replicas comes with scaling.
    draft = DraftClient(config.draft_addrs[0])
    verify = VerifyClient(config.verify_addrs[0])
    draft_desc, verify_desc = await asyncio.gather(
        wait_for_replica(draft, config.connect_timeout_s), wait_for_replica(verify, config.connect_timeout_s)
    )
    ours = vocab_hash(tokenizer.get_vocab())
    if not draft_desc.vocab_hash == verify_desc.vocab_hash == ours:
        raise RuntimeError(
            f"vocabularies differ: tokenizer {ours}, draft {draft_desc.vocab_hash} ({draft.address}), "
            f"verify {verify_desc.vocab_hash} ({verify.address}); draft and target must share a tokenizer"
        )
    max_context = min(draft_desc.max_context, verify_desc.max_context)
    costs = CostModel.from_tables(cost_table_from_proto(verify_desc.cost_table), cost_table_from_proto(draft_desc.cost_table))
    # No more live sequences than either replica holds: past that a Prefill would fail; the rest wait in the queue.
    max_live = min([config.max_live] + [d.max_sequences for d in (draft_desc, verify_desc) if d.max_sequences > 0])
    loop = StepLoop(tokenizer, draft, verify, max_context, costs, config.rpc_timeout_s, max_live, config.max_queued)
    requests = RequestBuilder(tokenizer, max_context, config.max_new_tokens_limit, config.default_policy,
                              make_policies(config.cast))

    server = grpc.aio.server(options=server_options())
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(loop, requests), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    model_id = verify_desc.model_name or config.tokenizer_dir.name
    # Bound here, before anything starts: a taken port fails the start-up at once.
    server.http = (HttpServer(create_app(loop, requests, model_id), config.host, config.http_port)
                   if config.http_port is not None else None)
    await server.start()
    if server.http is not None:  # before SERVING: a ready orchestrator answers both APIs
        await server.http.start()
        log.info("HTTP API on http://%s:%d (model %r)", config.host, server.http.port, model_id)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.health_servicer = health_servicer  # for graceful shutdown
    server.step_loop = loop                   # ... which releases the sequences' sessions last
    log.info("orchestrator serving on %s:%d (draft %s, verify %s, at most %d live sequences)",
             config.host, port, draft.address, verify.address, max_live)
    return server, port


async def serve(config: OrchestratorConfig, grace_s: float = 5.0) -> None:
    server, _ = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.health_servicer.enter_graceful_shutdown()
    await asyncio.gather(server.stop(grace_s), *([server.http.stop()] if server.http else []))
    await server.step_loop.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(OrchestratorConfig.from_args(argv)))


if __name__ == "__main__":
    main()
