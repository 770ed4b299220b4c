"""Verify service entry points: `start_server(config)` for tests and embedding, `main(argv)` for the CLI.

    python -m verify_service.server --model DIR --port 50053
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from cast.v1 import verify_pb2, verify_pb2_grpc
from cast_core.cost_table import CostTable
from cast_runtime.grpc_options import server_options
from cast_runtime.telemetry import Telemetry, setup_telemetry
from cast_runtime.wire import cost_table_to_proto
from verify_service.config import VerifyConfig
from verify_service.profile import startup_cost_table
from verify_service.servicer import VerifyServicer, expire_sessions_until_stopped
from verify_service.target import TargetModel
from verify_service.verifier import Verifier

log = logging.getLogger("verify_service")

SERVICE_NAME = verify_pb2.DESCRIPTOR.services_by_name["VerifyService"].full_name  # "cast.v1.VerifyService"

# Batch buckets whose CUDA graphs (every tree-size and context bucket) are captured at start-up; other buckets are
# captured on first use (that Verify says `cold`).
WARM_BATCHES = (1, 2, 4, 8)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    servicer: VerifyServicer
    expiry: asyncio.Task
    telemetry: Telemetry


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start(config: VerifyConfig) -> RunningServer:
    """Bind, load and warm the model, start serving, then report SERVING."""
    telemetry = setup_telemetry("verify", config.metrics_port, config.host)
    server = grpc.aio.server(options=server_options(), maximum_concurrent_rpcs=config.max_concurrent_rpcs,
                             interceptors=telemetry.server_interceptors(
                                 [f"/{SERVICE_NAME}/Prefill", f"/{SERVICE_NAME}/Release"]))
    # Bind before the (slow) model load, so a taken port fails at once.
    port = server.add_insecure_port(bind_address(config.host, config.port))
    if port == 0:
        raise RuntimeError(f"could not bind {bind_address(config.host, config.port)}")

    health = health_aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)

    # One worker thread: it loads the model and then runs every domain call (see servicer.py).
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-model")

    def load() -> tuple[Verifier, CostTable | None]:
        target = TargetModel.load(config.model, dtype=config.dtype, device=config.device,
                                  max_context=config.max_context, model_name=config.model_name)
        verifier = Verifier(target, max_batch=config.max_batch, session_ttl_s=config.session_ttl_s,
                            max_tree_tokens=config.max_tree_tokens)
        log.info("%s", verifier.static.describe())
        verifier.warm_up()
        if verifier.static.use_graphs:
            start = time.perf_counter()
            captured = verifier.static.capture_buckets(WARM_BATCHES)
            log.info("captured %d CUDA graphs for batches %s in %.1f s", captured,
                     ",".join(map(str, WARM_BATCHES)), time.perf_counter() - start)
        # After the warm-up, so that first-run costs stay out of the table; through the verifier, so that the table
        # prices its forward (and the graphs the profile captures stay for serving).
        return verifier, startup_cost_table(config, verifier)

    try:
        verifier, cost_table = await asyncio.get_running_loop().run_in_executor(executor, load)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    servicer = VerifyServicer(verifier, executor, telemetry)
    if cost_table is not None:
        servicer.description.cost_table.CopyFrom(cost_table_to_proto(cost_table))
    verify_pb2_grpc.add_VerifyServiceServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    await server.start()
    expiry = asyncio.create_task(expire_sessions_until_stopped(server, servicer, config.expire_interval_s))
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    target = verifier.target
    log.info(
        "verify service on %s: %s (%s, %s, max_context %d)",
        bind_address(config.host, port), target.model_name, target.device, target.dtype_name, target.max_context,
    )
    return RunningServer(server=server, port=port, health=health, servicer=servicer, expiry=expiry, telemetry=telemetry)


async def start_server(config: VerifyConfig) -> tuple[grpc.aio.Server, int]:
    """Start a serving verify service; returns the server and the bound port (config.port may be 0)."""
    running = await start(config)
    return running.server, running.port


async def serve(config: VerifyConfig) -> None:
    """Serve until SIGTERM or SIGINT; then drain: report NOT_SERVING at once and keep answering for the sequences held
    until they are gone (orchestrators move them to other replicas) or config.grace_s passes."""
    running = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: NOT_SERVING, serving the %d sequences held for up to %.0f s", len(running.servicer.verifier.sessions),
             config.grace_s)
    await running.health.enter_graceful_shutdown()
    await drain(lambda: len(running.servicer.verifier.sessions), config.grace_s)
    await running.server.stop(1.0)
    await running.expiry
    running.telemetry.shutdown()


async def drain(held: Callable[[], int], grace_s: float) -> None:
    """Wait until no sequence is held or grace_s passed."""
    deadline = asyncio.get_running_loop().time() + grace_s
    while held() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(VerifyConfig.from_args(argv)))


if __name__ == "__main__":
    main()
