"""VerifyConfig: every setting of the verify service, from command-line flags with CAST_VERIFY_* fallbacks.

A flag wins over its environment variable, which wins over the default; `--help` lists them all.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("auto", "float64", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")  # "cuda:N" is accepted too


@dataclass
class VerifyConfig:
    model: Path  # a local Hugging Face checkpoint directory (config, weights, tokenizer)
    host: str = "0.0.0.0"
    port: int = 50053  # 0: let the OS pick one (start_server returns it)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    max_context: int | None = None  # None: the model's max_position_embeddings
    max_batch: int = 32  # KV slots: the most live sequences, so also the largest batch
    max_tree_tokens: int = 128  # the largest tree per sequence a Verify may send
    session_ttl_s: float = 600.0  # a sequence idle this long is dropped
    model_name: str = ""  # reported by Describe; empty: the checkpoint directory's name
    grace_s: float = 30.0  # on SIGTERM: NOT_SERVING, and calls answered this long while sequences are held
    max_concurrent_rpcs: int | None = None  # extra calls get RESOURCE_EXHAUSTED; None: no limit
    cost_table: Path | None = None  # a profiled table (cast profile verify) for Describe; None: cached or profiled
    profile: bool = True  # without --cost-table and cache entry, profile a small grid at start-up; off: no table
    metrics_port: int | None = None  # the Prometheus scrape endpoint (/metrics); None or 0: off

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        if not (self.model / "config.json").is_file():
            raise ValueError(f"model: {self.model} is not a checkpoint directory (no config.json)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device: {self.device!r} is not one of {', '.join(DEVICES)} or cuda:N")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is outside 0..65535")
        if self.max_context is not None and self.max_context < 1:
            raise ValueError(f"max_context: {self.max_context} must be at least 1")
        if self.max_batch < 1:
            raise ValueError(f"max_batch: {self.max_batch} must be at least 1")
        if self.max_tree_tokens < 1:
            raise ValueError(f"max_tree_tokens: {self.max_tree_tokens} must be at least 1")
        if self.session_ttl_s <= 0:
            raise ValueError(f"session_ttl_s: {self.session_ttl_s} must be positive")
        if self.grace_s < 0:
            raise ValueError(f"grace_s: {self.grace_s} must not be negative")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs: {self.max_concurrent_rpcs} must be at least 1")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port: {self.metrics_port} is outside 0..65535")
        if self.cost_table is not None:
            self.cost_table = Path(self.cost_table)
            if not self.cost_table.is_file():
                raise ValueError(f"cost_table: {self.cost_table} is not a file")

    @property
    def expire_interval_s(self) -> float:
        """How often idle sequences are looked for: often enough that one outlives its TTL by a quarter at most."""
        return min(10.0, self.session_ttl_s / 4)

    @staticmethod
    def from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> VerifyConfig:
        """Parse flags; a missing flag falls back to CAST_VERIFY_<NAME> in `environ` (os.environ by default)."""
        args = build_arg_parser(os.environ if environ is None else environ).parse_args(argv)
        if args.model is None:
            raise SystemExit("verify service: --model DIR (or CAST_VERIFY_MODEL) is required")
        try:
            return VerifyConfig(**vars(args))
        except ValueError as e:
            raise SystemExit(f"verify service: {e}") from e


def _optional_int(text: str) -> int | None:
    return None if text in ("", "none", "None") else int(text)


def _optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def build_arg_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cast serve verify", description="CAST verify service (the target model)")

    def flag(name: str, type_, default, help_: str) -> None:
        env = "CAST_VERIFY_" + name.upper()
        # argparse runs `type` on string defaults, so an environment value is parsed like a flag.
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=type_,
            default=environ.get(env, default),
            help=f"{help_} (env {env}; default {default})",
        )

    flag("model", Path, None, "local checkpoint directory of the target model")
    flag("host", str, "0.0.0.0", "address to bind")
    flag("port", int, 50053, "port to bind; 0 picks a free one")
    flag("dtype", str, "auto", "one of " + ", ".join(DTYPES))
    flag("device", str, "auto", "auto, cpu, cuda or cuda:N")
    flag("max_context", _optional_int, None, "context length limit; default the model's max_position_embeddings")
    flag("max_batch", int, 32, "KV slots: the most live sequences, so also the largest batch (more: RESOURCE_EXHAUSTED)")
    flag("max_tree_tokens", int, 128, "the most nodes per tree in a Verify (more: INVALID_ARGUMENT)")
    flag("session_ttl_s", float, 600.0, "seconds an idle sequence lives")
    flag("model_name", str, "", "name reported by Describe; default the directory's name")
    flag("grace_s", float, 30.0, "on SIGTERM: NOT_SERVING, and calls answered this long while sequences are held")
    flag("max_concurrent_rpcs", _optional_int, None, "admission limit; extra calls get RESOURCE_EXHAUSTED")
    flag("cost_table", _optional_path, None, "cost table JSON for Describe (from `cast profile verify`)")
    flag("profile", _bool, True, "without --cost-table or a cached table, profile a small grid at start-up")
    flag("metrics_port", _optional_int, None, "serve Prometheus metrics at /metrics on this port; 0 or none: off")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="same as --profile false")
    return parser
