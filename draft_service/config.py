"""The draft service's settings: argv flags, with CAST_DRAFT_* environment variables as fallbacks."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

from cast_runtime.cache import default_cache_dir
from draft_service.export import DTYPES, LAYOUTS

PROVIDERS = ("auto", "cpu", "cuda")
MODEL_THREADS = ("worker", "loop")


@dataclass
class DraftConfig:
    model: Path                     # local checkpoint directory of the draft (transformers format)
    host: str = "0.0.0.0"
    port: int = 50052               # 0: any free port (tests)
    provider: str = "auto"          # onnxruntime provider: auto (CUDA if available) | cpu | cuda
    top_k: int = 8                  # K fused into the exported graph: the most children a node can propose
    dtype: str = "auto"             # export dtype: float32 | float16 | auto (float16 on CUDA, float32 on CPU)
    cache_dir: Path | None = None   # export cache; None: $CAST_CACHE_DIR or ~/.cache/cast-serve
    max_sessions: int = 1024        # live sequences at most
    session_ttl_s: float = 600.0    # idle sequences expire after this
    max_context: int = 0            # tokens per sequence at most; 0: the model's max_position_embeddings
    grace_s: float = 30.0           # on SIGTERM: NOT_SERVING, and calls answered this long while sequences are held
    cost_table: Path | None = None  # a profiled table (cast profile draft) for Describe; None: cached or profiled
    profile: bool = True            # without --cost-table and cache entry, profile a small grid at start-up
    threads: int = 0                # ORT intra-op threads; 0: ORT's default (one per physical core)
    spinning: bool = False          # let ORT's idle threads spin: faster alone, slower beside a CPU verifier
    layout: str = "auto"            # KV layout: dynamic (a growing cache, host-kept) | static (device buffers and
                                    # CUDA graphs on CUDA) | auto (static on CUDA, dynamic on CPU)
    model_thread: str = "worker"    # where model calls run: worker (a thread of their own) | loop (the event loop:
                                    # a step saves two thread hand-offs; other calls wait for the step)
    metrics_port: int = 0           # the Prometheus scrape endpoint (/metrics); 0: off

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        if self.cache_dir is None:
            self.cache_dir = default_cache_dir()
        self.cache_dir = Path(self.cache_dir)
        if not (self.model / "config.json").is_file():
            raise ValueError(f"model: {self.model} is not a checkpoint directory (no config.json)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is outside [0, 65535]")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port: {self.metrics_port} is outside [0, 65535]")
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider: {self.provider!r} is not one of {PROVIDERS}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype: {self.dtype!r} is not one of {('auto', *DTYPES)}")
        if self.layout not in ("auto", *LAYOUTS):
            raise ValueError(f"layout: {self.layout!r} is not one of {('auto', *LAYOUTS)}")
        if self.model_thread not in MODEL_THREADS:
            raise ValueError(f"model_thread: {self.model_thread!r} is not one of {MODEL_THREADS}")
        if self.top_k < 1:
            raise ValueError(f"top_k: {self.top_k} must be >= 1")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions: {self.max_sessions} must be >= 1")
        if self.session_ttl_s <= 0:
            raise ValueError(f"session_ttl_s: {self.session_ttl_s} must be > 0")
        if self.max_context < 0:
            raise ValueError(f"max_context: {self.max_context} must be >= 0")
        if self.threads < 0:
            raise ValueError(f"threads: {self.threads} must be >= 0")
        if self.grace_s < 0:
            raise ValueError(f"grace_s: {self.grace_s} must be >= 0")
        if self.cost_table is not None:
            self.cost_table = Path(self.cost_table)
            if not self.cost_table.is_file():
                raise ValueError(f"cost_table: {self.cost_table} is not a file")

    @staticmethod
    def from_args(argv: list[str] | None = None) -> DraftConfig:
        """Parse flags (`--model DIR --port N ...`); a flag left out falls back to CAST_DRAFT_<NAME>, then the
        default."""
        parser = argparse.ArgumentParser(prog="cast serve draft", description="CAST Serve draft-model service")
        for f in fields(DraftConfig):
            flag = "--" + f.name.replace("_", "-")
            env = "CAST_DRAFT_" + f.name.upper()
            parser.add_argument(flag, dest=f.name, default=os.environ.get(env), help=f"(env {env})")
        parser.add_argument("--no-profile", dest="profile", action="store_const", const="false",
                            help="serve without a cost table rather than profile at start-up")
        args = vars(parser.parse_args(argv))
        if args["model"] is None:
            parser.error("--model (or CAST_DRAFT_MODEL) is required")
        types = {"port": int, "metrics_port": int, "top_k": int, "max_sessions": int, "max_context": int, "threads": int,
                 "session_ttl_s": float, "grace_s": float, "profile": boolean, "spinning": boolean}
        kwargs = {}
        for name, value in args.items():
            if value is None:
                continue
            try:
                kwargs[name] = types.get(name, str)(value)
            except ValueError:
                parser.error(f"--{name.replace('_', '-')}: {value!r} is not a {types[name].__name__}")
        return DraftConfig(**kwargs)


def boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)
