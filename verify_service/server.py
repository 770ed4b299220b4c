"""Verify service entry points: `start_server(config)` for tests and embedding, `main(argv)` for the CLI.

    python -m verify_service.server --model DIR --port 50053
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from cast.v1 import verify_pb2, verify_pb2_grpc
from cast_core.cost_table import CostTable
from cast_runtime import serving
from cast_runtime.cache import startup_lock
from cast_runtime.telemetry import setup_telemetry
from cast_runtime.wire import cost_table_to_proto
from verify_service.config import VerifyConfig
from verify_service.profile import startup_cost_table
from verify_service.servicer import VerifyServicer, expire_sessions_until_stopped
from verify_service.target import TargetModel
from verify_service.verifier import Verifier

log = logging.getLogger("verify_service")

SERVICE_NAME = verify_pb2.DESCRIPTOR.services_by_name["VerifyService"].full_name  # "cast.v1.VerifyService"

@dataclass
class RunningServer:
    grpc: serving.GrpcServer
    servicer: VerifyServicer
    expiry: asyncio.Task

    @property
    def server(self) -> grpc.aio.Server:
        return self.grpc.server

    @property
    def port(self) -> int:
        return self.grpc.port


async def start(config: VerifyConfig) -> RunningServer:
    """Bind, load and warm the model, start serving, then report SERVING."""
    # Bound before the (slow) model load, so a taken port fails at once.
    telemetry = setup_telemetry("verify", config.metrics_port, config.host)
    server = serving.GrpcServer(SERVICE_NAME, config.host, config.port, config.max_concurrent_rpcs, tls=config.tls,
                                interceptors=telemetry.server_interceptors([f"/{SERVICE_NAME}/Prefill",
                                                                            f"/{SERVICE_NAME}/Release"]))

    # One worker thread: it loads the model and then runs every domain call (see servicer.py).
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-model")

    def load() -> tuple[Verifier, CostTable | None]:
        with startup_lock(None, log, "verify service"):  # its table is profiled on a quiet host (cache.py)
            return load_and_profile()

    def load_and_profile() -> tuple[Verifier, CostTable | None]:
        target = TargetModel.load(config.model, dtype=config.dtype, device=config.device,
                                  max_context=config.max_context, model_name=config.model_name)
        verifier = Verifier(target, max_batch=config.max_batch, session_ttl_s=config.session_ttl_s,
                            max_tree_tokens=config.max_tree_tokens)
        log.info("%s", verifier.static.describe())
        verifier.warm_up()
        if verifier.static.use_graphs:
            start, reserved = time.perf_counter(), torch.cuda.memory_reserved(verifier.target.device)
            captured = verifier.static.capture_buckets()  # every batch bucket up to max_batch
            log.info("captured %d CUDA graphs for batches %s in %.1f s (%.2f GiB more GPU memory reserved)",
                     captured, ",".join(map(str, verifier.static.batch_buckets)), time.perf_counter() - start,
                     (torch.cuda.memory_reserved(verifier.target.device) - reserved) / 2**30)
        # After the warm-up, so that first-run costs stay out of the table; through the verifier, so that the table
        # prices its forward (and the graphs the profile captures stay for serving).
        table = startup_cost_table(config, verifier)
        if verifier.target.device.type == "cuda":
            device = verifier.target.device
            log.info("GPU memory: %.2f GiB allocated, %.2f GiB reserved, %.2f GiB at the peak of start-up",
                     torch.cuda.memory_allocated(device) / 2**30, torch.cuda.memory_reserved(device) / 2**30,
                     torch.cuda.max_memory_allocated(device) / 2**30)
        return verifier, table

    try:
        verifier, cost_table = await asyncio.get_running_loop().run_in_executor(executor, load)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    servicer = VerifyServicer(verifier, executor, telemetry)
    if cost_table is not None:
        servicer.description.cost_table.CopyFrom(cost_table_to_proto(cost_table))
    verify_pb2_grpc.add_VerifyServiceServicer_to_server(servicer, server.server)
    await server.start()
    expiry = asyncio.create_task(expire_sessions_until_stopped(server.server, servicer, config.expire_interval_s))
    target = verifier.target
    log.info("verify service on %s: %s (%s, %s, max_context %d)", server.address, target.model_name, target.device,
             target.dtype_name, target.max_context)
    return RunningServer(server, servicer, expiry)


async def start_server(config: VerifyConfig) -> tuple[grpc.aio.Server, int]:
    """Start a serving verify service; returns the server and the bound port (config.port may be 0)."""
    running = await start(config)
    return running.server, running.port


async def serve(config: VerifyConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain (cast_runtime.serving) and stop."""
    running = await start(config)
    await running.grpc.serve_until_signalled(config.grace_s, held=lambda: len(running.servicer.verifier.sessions))
    await running.expiry
    running.servicer.telemetry.shutdown()


def main(argv: list[str] | None = None) -> None:
    serving.run(serve, VerifyConfig.from_args(argv))


if __name__ == "__main__":
    main()
