"""The draft service's process: export (or load from cache), warm up, then serve gRPC until SIGTERM/SIGINT.

    python -m draft_service.server --model DIR --port 50052
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np

from cast.v1 import common_pb2, draft_pb2, draft_pb2_grpc
from cast_runtime import serving
from cast_runtime.cache import startup_lock
from cast_runtime.identity import vocab_hash
from cast_runtime.sessions import SessionStore
from cast_runtime.telemetry import setup_telemetry
from cast_runtime.wire import cost_table_to_proto
from draft_service.config import DraftConfig
from draft_service.expansion import Budget, Expander, SequenceInput
from draft_service.export import export_draft
from draft_service.levels import KINDS, Levels, LevelSpec, lookup_cost_table
from draft_service.profile import device_name, startup_cost_table
from draft_service.runner import BATCH_BUCKETS, TREE_ROOM, DraftRunner, choose_dtype, choose_provider
from draft_service.servicer import DraftServicer
from draft_service.sparse import build_sparse_checkpoint, load_choice

log = logging.getLogger(__name__)
SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name  # "cast.v1.DraftService"


@dataclass
class Running:
    grpc: serving.GrpcServer
    servicer: DraftServicer

    @property
    def server(self) -> grpc.aio.Server:
        return self.grpc.server

    @property
    def port(self) -> int:
        return self.grpc.port


def checkpoint_vocab(model_dir: Path) -> dict[str, int]:
    """The tokenizer's vocabulary (added tokens included), as PreTrainedTokenizerFast.get_vocab() gives it.

    From tokenizer.json with the `tokenizers` library when there is one, so that a cached start imports no torch.
    """
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).get_vocab()


def build_model_level(config: DraftConfig, spec: LevelSpec, default: bool):
    """Export or load one model level's graph, open its ORT session, warm it up, take its cost table (--cost-table
    is the default level's). Returns (expander, checkpoint dir, cost table or None)."""
    provider = choose_provider(config.provider)
    model_dir = spec.path
    if spec.name == "sparse" and load_choice(spec.path) is None:  # a target: choose its layers (cached)
        model_dir = build_sparse_checkpoint(spec.path, spec.layers, cache_dir=config.cache_dir)
    onnx_path, meta = export_draft(model_dir, top_k=config.top_k, dtype=choose_dtype(config.dtype, provider),
                                   cache_dir=config.cache_dir)
    max_context = config.max_context or meta.max_context
    if meta.max_context and max_context > meta.max_context:
        raise ValueError(f"max_context: {max_context} exceeds the {spec.name} model's {meta.max_context} positions")
    runner = DraftRunner(onnx_path, meta, provider=config.provider, capacity=max_context + TREE_ROOM,
                         threads=config.threads, max_batch=config.max_batch)
    if runner.cuda_graphs:  # every batch bucket's graphs now: a capture inside a step costs more than the step
        start = time.perf_counter()
        runner.warm(BATCH_BUCKETS)
        log.info("captured the %s level's CUDA graphs for batches %s in %.1f s", spec.name,
                 ",".join(map(str, BATCH_BUCKETS)), time.perf_counter() - start)
    if not runner.fixed_buffers:
        runner.warm_memory()  # the memory of the largest forward, now: serving then adds none
    expander = Expander(runner, SessionStore(config.max_sessions, config.session_ttl_s), max_context)
    warm_up(expander)
    level_config = replace(config, model=model_dir, draft_level=(), cost_table=config.cost_table if default else None)
    cost_table = startup_cost_table(runner, level_config)  # after the warm-up: first-run costs stay out of it
    return expander, model_dir, cost_table


def model_name(spec: LevelSpec, expander: Expander) -> str:
    """The draft's directory name; a sparse level's: the target's, with the layers it keeps."""
    name = spec.path.resolve().name
    if spec.name == "sparse" and load_choice(spec.path) is None:
        return f"{name}-sparse{expander.runner.meta.num_layers}"
    return name


def build_expander(config: DraftConfig) -> tuple[Levels, common_pb2.ReplicaDescription]:
    """Every level of the config (levels.py), warmed up and priced; describe the replica (its default level's
    model, runner and table, and each level's table)."""
    specs = {spec.name: spec for spec in config.levels}
    models, dirs, tables = {}, {}, {}
    default = next(k for k in KINDS if k in specs and k != "lookup")
    for name, spec in specs.items():
        if name != "lookup":
            models[name], dirs[name], tables[name] = build_model_level(config, spec, name == default)
    if "lookup" in specs:
        tables["lookup"] = lookup_cost_table()
    first = models[default]
    meta = first.runner.meta
    max_context = min(m.max_context for m in models.values())
    levels = Levels(models, "lookup" in specs, SessionStore(config.max_sessions, config.session_ttl_s),
                    meta.vocab_size, max_context)
    vocab = checkpoint_vocab(dirs[default])
    replica = common_pb2.ReplicaDescription(
        model_name=model_name(specs[default], models[default]),
        vocab_hash=vocab_hash(vocab),
        vocab_size=meta.vocab_size,
        max_context=max_context,
        device=device_name(first.runner.provider),
        dtype=meta.dtype,
        backend=first.runner.backend,
        max_sequences=config.max_sessions,
    )
    if tables[default] is not None:
        replica.cost_table.CopyFrom(cost_table_to_proto(tables[default]))
    for name in levels.names:
        level = replica.draft_levels.add(name=name, kind=name)
        if name in models:
            level.model_name = model_name(specs[name], models[name])
        if tables[name] is not None:
            level.cost_table.CopyFrom(cost_table_to_proto(tables[name]))
    log.info("draft levels %s (default %s)", levels.names, default)
    return levels, replica


def build_on_quiet_host(config: DraftConfig) -> tuple[Levels, common_pb2.ReplicaDescription]:
    with startup_lock(config.cache_dir, log, "draft service"):
        return build_expander(config)


def warm_up(expander: Expander) -> None:
    """One small expansion with a prompt, then one incremental: the first real call pays no first-run costs."""
    k = expander.runner.meta.top_k
    sid = "__warmup__"
    tokens = np.arange(4, dtype=np.int64) % expander.runner.meta.vocab_size
    budget = Budget(top_k=min(2, k), max_depth=2, max_breadth=2)
    try:
        expander.expand([SequenceInput(sid, tokens, 0)], budget)
        expander.expand([SequenceInput(sid, tokens[:1], len(tokens))], budget)
    finally:
        expander.release([sid])


async def start(config: DraftConfig) -> Running:
    telemetry = setup_telemetry("draft", config.metrics_port, config.host)
    server = serving.GrpcServer(SERVICE_NAME, config.host, config.port, tls=config.tls,
                                interceptors=telemetry.server_interceptors([f"/{SERVICE_NAME}/Release"]))
    # Export and warm-up are seconds of CPU work: keep them off the event loop, and off another service's start-up
    # (its cost table, or this one's, would be profiled under that load: cache.py).
    expander, replica = await asyncio.to_thread(build_on_quiet_host, config)
    servicer = DraftServicer(expander, replica, telemetry)
    draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, server.server)
    await server.start()
    # Keep a reference, or the task may be garbage-collected; serve() cancels it on shutdown.
    servicer.expiry_task = asyncio.create_task(servicer.expire_periodically(min(config.session_ttl_s / 2, 10.0)))
    log.info("draft service on %s (%s, %s)", server.address, replica.backend, replica.model_name)
    return Running(server, servicer)


async def start_server(config: DraftConfig) -> tuple[grpc.aio.Server, int]:
    """Export/load and warm up the model, then serve; returns the server and its bound port (port 0: any)."""
    running = await start(config)
    return running.server, running.port


async def serve(config: DraftConfig) -> None:
    running = await start(config)
    await running.grpc.serve_until_signalled(config.grace_s, held=lambda: len(running.servicer.expander.sessions))
    running.servicer.close()
    running.servicer.telemetry.shutdown()


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cast serve draft ...` and `python -m draft_service.server ...`."""
    serving.run(serve, DraftConfig.from_args(argv))


if __name__ == "__main__":
    main()
