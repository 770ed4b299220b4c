"""VerifyConfig: every setting of the verify service, from command-line flags with CAST_VERIFY_* fallbacks.

A flag wins over its environment variable, which wins over the default; `--help` lists them all.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from verify_service.fused_llama import FORWARDS

DTYPES = ("auto", "float64", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")  # "cuda:N" is accepted too
# Implementations that take our custom additive 4D tree mask as-is (flash-attention would ignore it).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
CUDA_GRAPHS = ("auto", "on", "off")
MODEL_THREADS = ("worker", "loop")
DYNAMIC_SESSIONS = 256  # the session cap of the growing KV layout when --max-sessions is not given


@dataclass
class VerifyConfig:
    model: Path  # a local Hugging Face checkpoint directory (config, weights, tokenizer)
    host: str = "0.0.0.0"
    port: int = 50053  # 0: let the OS pick one (start_server returns it)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    attn_implementation: str = "sdpa"
    # auto: our fused Llama forward where it applies (elementwise kernels compiled on CUDA), else transformers'
    forward: str = "auto"
    max_sessions: int | None = None  # None: max_batch with the static layout, else DYNAMIC_SESSIONS
    session_ttl_s: float = 600.0  # a sequence idle this long is dropped
    expire_interval_s: float = 10.0  # how often idle sequences are looked for
    max_context: int | None = None  # None: the model's max_position_embeddings
    model_name: str = ""  # reported by Describe; empty: the checkpoint directory's name
    grace_s: float = 30.0  # on SIGTERM: NOT_SERVING, and calls answered this long while sequences are held
    max_concurrent_rpcs: int | None = None  # extra calls get RESOURCE_EXHAUSTED; None: no limit
    warmup: bool = True  # run one prefill + verify before reporting SERVING
    cost_table: Path | None = None  # a profiled table (cast profile verify) for Describe; None: cached or profiled
    profile: bool = True  # without --cost-table and cache entry, profile a small grid at start-up; off: no table
    # The static KV layout (buffers allocated once, bucketed shapes; static_forward.py) with CUDA graphs on CUDA.
    # auto: on when the device is CUDA; on: also on CPU (static layout without graphs); off: growing KV, eager.
    cuda_graphs: str = "auto"
    max_batch: int = 32  # static layout: KV slots S, so also the most live sequences
    max_tree_tokens: int = 128  # static layout: the largest tree per sequence a Verify may send
    # Where model calls run: "worker", one thread of their own (the event loop stays free for other calls), or
    # "loop", on the event loop (a step saves two thread hand-offs, ~0.15 ms on the GPU machines; other calls
    # wait for the step in progress).
    model_thread: str = "worker"

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        if not (self.model / "config.json").is_file():
            raise ValueError(f"model: {self.model} is not a checkpoint directory (no config.json)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device: {self.device!r} is not one of {', '.join(DEVICES)} or cuda:N")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation: {self.attn_implementation!r} is not one of {ATTN_IMPLEMENTATIONS}")
        if self.forward not in FORWARDS:
            raise ValueError(f"forward: {self.forward!r} is not one of {', '.join(FORWARDS)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is outside 0..65535")
        if self.max_sessions is not None and self.max_sessions < 1:
            raise ValueError(f"max_sessions: {self.max_sessions} must be at least 1")
        if self.cuda_graphs not in CUDA_GRAPHS:
            raise ValueError(f"cuda_graphs: {self.cuda_graphs!r} is not one of {', '.join(CUDA_GRAPHS)}")
        if self.model_thread not in MODEL_THREADS:
            raise ValueError(f"model_thread: {self.model_thread!r} is not one of {', '.join(MODEL_THREADS)}")
        if self.max_batch < 1 or self.max_tree_tokens < 1:
            raise ValueError("max_batch and max_tree_tokens must be at least 1")
        if self.cuda_graphs == "on" or self.cuda_graphs == "auto" and self.device.startswith("cuda"):
            self.session_cap(static=True)  # raises now, not after loading the model (auto + device auto: at load)
        if self.session_ttl_s <= 0 or self.expire_interval_s <= 0:
            raise ValueError("session_ttl_s and expire_interval_s must be positive")
        if self.max_context is not None and self.max_context < 1:
            raise ValueError(f"max_context: {self.max_context} must be at least 1")
        if self.grace_s < 0:
            raise ValueError(f"grace_s: {self.grace_s} must not be negative")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs: {self.max_concurrent_rpcs} must be at least 1")
        if self.cost_table is not None:
            self.cost_table = Path(self.cost_table)
            if not self.cost_table.is_file():
                raise ValueError(f"cost_table: {self.cost_table} is not a file")

    def static_layout(self, device_type: str) -> bool:
        """Whether the verifier uses the static KV layout on a device of this type ("cuda", "cpu")."""
        return self.cuda_graphs == "on" or self.cuda_graphs == "auto" and device_type == "cuda"

    def session_cap(self, static: bool) -> int:
        """The most live sequences. In the static layout every sequence owns one of max_batch KV slots, so the cap
        must not exceed max_batch (ValueError)."""
        if self.max_sessions is None:
            return self.max_batch if static else DYNAMIC_SESSIONS
        if static and self.max_sessions > self.max_batch:
            raise ValueError(
                f"max_sessions: {self.max_sessions} exceeds max_batch {self.max_batch}; with the static KV layout "
                f"(--cuda-graphs on, or auto on CUDA) each live sequence owns one of max_batch slots: raise "
                f"--max-batch or lower --max-sessions"
            )
        return self.max_sessions

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
    flag("attn_implementation", str, "sdpa", "one of " + ", ".join(ATTN_IMPLEMENTATIONS))
    flag("forward", str, "auto", "the target's forward: auto (fused where it applies, compiled on CUDA), compiled, "
         "fused or transformers")
    flag("max_sessions", _optional_int, None,
         f"live sequences at most; default max_batch with the static layout, else {DYNAMIC_SESSIONS}")
    flag("session_ttl_s", float, 600.0, "seconds an idle sequence lives")
    flag("expire_interval_s", float, 10.0, "seconds between looks for idle sequences")
    flag("max_context", _optional_int, None, "context length limit; default the model's max_position_embeddings")
    flag("model_name", str, "", "name reported by Describe; default the directory's name")
    flag("grace_s", float, 30.0, "on SIGTERM: NOT_SERVING, and calls answered this long while sequences are held")
    flag("max_concurrent_rpcs", _optional_int, None, "admission limit; extra calls get RESOURCE_EXHAUSTED")
    flag("warmup", _bool, True, "run one step before reporting SERVING")
    flag("cost_table", _optional_path, None, "cost table JSON for Describe (from `cast profile verify`)")
    flag("profile", _bool, True, "without --cost-table or a cached table, profile a small grid at start-up")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="same as --profile false")
    flag("cuda_graphs", str, "auto", "static KV layout + CUDA graphs: auto (on with CUDA), on (CPU: static, no "
         "graphs) or off (growing KV, eager)")
    flag("max_batch", int, 32, "static layout: KV slots, so the most live sequences and the largest batch")
    flag("max_tree_tokens", int, 128, "static layout: the most nodes per tree in a Verify (more: INVALID_ARGUMENT)")
    flag("model_thread", str, "worker", "where model calls run: worker (a thread of their own) or loop (the event "
         "loop: ~0.15 ms less per step; other calls wait for the step)")
    return parser
