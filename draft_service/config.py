"""The draft service's settings: argv flags, with CAST_DRAFT_* environment variables as fallbacks."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

from cast_runtime.cache import default_cache_dir
from draft_service.export import DTYPES
from draft_service.levels import LevelSpec, parse_level

PROVIDERS = ("auto", "cpu", "cuda")


@dataclass
class DraftConfig:
    model: Path | None = None       # local checkpoint directory of the draft (transformers format): level `small`
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
    threads: int = 0                # ORT intra-op threads; 0: ORT's default (one per physical core of the host,
                                    # more than a container's CPU limit may allow)
    draft_level: tuple = ()         # more levels, NAME=SPEC each (levels.py): small=DIR, sparse=TARGET_DIR, lookup

    def __post_init__(self) -> None:
        if self.cache_dir is None:
            self.cache_dir = default_cache_dir()
        self.cache_dir = Path(self.cache_dir)
        if self.model is not None:
            self.model = Path(self.model)
            if not (self.model / "config.json").is_file():
                raise ValueError(f"model: {self.model} is not a checkpoint directory (no config.json)")
        self.draft_level = tuple(parse_level(x) if isinstance(x, str) else x for x in self.draft_level)
        names = [spec.name for spec in self.levels]
        if len(set(names)) != len(names):
            raise ValueError(f"draft_level: each level at most once (--model is level small), got {names}")
        if not any(name != "lookup" for name in names):
            raise ValueError("model: a draft model (--model) or a model level (--draft-level small=DIR or "
                             "sparse=TARGET_DIR) is required")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is outside [0, 65535]")
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider: {self.provider!r} is not one of {PROVIDERS}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype: {self.dtype!r} is not one of {('auto', *DTYPES)}")
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

    @property
    def levels(self) -> list[LevelSpec]:
        """Every level served: --model as `small`, then the --draft-level flags."""
        small = [LevelSpec("small", self.model)] if self.model is not None else []
        return small + list(self.draft_level)

    @staticmethod
    def from_args(argv: list[str] | None = None) -> DraftConfig:
        """Parse flags (`--model DIR --port N ...`); a flag left out falls back to CAST_DRAFT_<NAME>, then the
        default."""
        parser = argparse.ArgumentParser(prog="cast serve draft", description="CAST Serve draft-model service")
        for f in fields(DraftConfig):
            if f.name == "draft_level":
                parser.add_argument("--draft-level", dest="draft_level", action="append", metavar="NAME=SPEC",
                                    help="a draft level, repeatable (env CAST_DRAFT_DRAFT_LEVEL, ';'-separated)")
                continue
            flag = "--" + f.name.replace("_", "-")
            env = "CAST_DRAFT_" + f.name.upper()
            parser.add_argument(flag, dest=f.name, default=os.environ.get(env), help=f"(env {env})")
        parser.add_argument("--no-profile", dest="profile", action="store_const", const="false",
                            help="serve without a cost table rather than profile at start-up")
        args = vars(parser.parse_args(argv))
        if args["draft_level"] is None and os.environ.get("CAST_DRAFT_DRAFT_LEVEL"):
            args["draft_level"] = [x for x in os.environ["CAST_DRAFT_DRAFT_LEVEL"].split(";") if x]
        if args["model"] is None and not args["draft_level"]:
            parser.error("--model or --draft-level (or CAST_DRAFT_MODEL, CAST_DRAFT_DRAFT_LEVEL) is required")
        if args["draft_level"]:
            args["draft_level"] = tuple(args["draft_level"])
        types = {"port": int, "top_k": int, "max_sessions": int, "max_context": int, "threads": int,
                 "session_ttl_s": float, "grace_s": float, "profile": boolean}
        kwargs = {}
        for name, value in args.items():
            if value is None:
                continue
            try:
                kwargs[name] = value if name == "draft_level" else types.get(name, str)(value)
            except ValueError:
                parser.error(f"--{name.replace('_', '-')}: {value!r} is not a {types[name].__name__}")
        return DraftConfig(**kwargs)


def boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)
