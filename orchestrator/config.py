"""The orchestrator's configuration: one dataclass, from flags with environment fallbacks (CAST_ORCH_*)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from cast_core.selection import CastParams
from orchestrator.discovery import Target, parse_target


def _env(name: str, default: str) -> str:
    return os.environ.get(f"CAST_ORCH_{name}", default)


@dataclass
class OrchestratorConfig:
    tokenizer_dir: Path                      # the target checkpoint directory (its tokenizer)
    draft: str = "127.0.0.1:50052"           # draft replicas: host:port[,host:port...] or dns:///NAME:PORT
    verify: str = "127.0.0.1:50053"          # verify replicas, likewise
    host: str = "127.0.0.1"
    port: int = 50051
    max_new_tokens_limit: int = 4096         # larger requests are OUT_OF_RANGE
    default_policy: str = "cast"
    rpc_timeout_s: float = 60.0              # per downstream call
    max_live: int = 64                       # sequences decoded together at most; start-up lowers it to the slots
                                             # that the draft and verify replicas report (Describe: max_sequences)
    max_queued: int = 256                    # waiting beyond the batch; past it, RESOURCE_EXHAUSTED at once
    connect_timeout_s: float = 300.0         # how long start-up waits for the draft and verify services
    refresh_s: float = 5.0                   # DNS re-resolution and replica health checks this often
    grace_s: float = 30.0                    # on SIGTERM, running requests get this long to finish
    draft_target: Target = field(init=False, repr=False)   # parsed from `draft`
    verify_target: Target = field(init=False, repr=False)  # parsed from `verify`
    cast: CastParams = field(default_factory=CastParams)  # C1, C2, C3 and R of the `cast` policy
    http_port: int | None = None             # the OpenAI-compatible HTTP API (http_api.py); None: off, 0: any free port
    metrics_port: int | None = None          # the Prometheus scrape endpoint (/metrics); None or 0: off

    def __post_init__(self) -> None:
        self.tokenizer_dir = Path(self.tokenizer_dir)
        self.draft_target = parse_target(self.draft, "draft")
        self.verify_target = parse_target(self.verify, "verify")
        if self.refresh_s <= 0 or self.grace_s < 0:
            raise ValueError("refresh_s must be positive and grace_s not negative")
        for name in ("port", "http_port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 65536:
                raise ValueError(f"{name} {value} is out of range")
        from orchestrator.policies import POLICIES

        if self.default_policy not in POLICIES:
            raise ValueError(f"unknown default policy {self.default_policy!r}; choose one of {', '.join(POLICIES)}")
        if self.max_live < 1 or self.max_queued < 0:
            raise ValueError("max_live must be at least 1 and max_queued at least 0")
        if self.max_new_tokens_limit < 1:
            raise ValueError("max_new_tokens_limit must be at least 1")

    @staticmethod
    def from_args(argv: list[str] | None = None) -> OrchestratorConfig:
        p = argparse.ArgumentParser(prog="cast serve orchestrator", description="The public Generate service.")
        p.add_argument("--tokenizer", default=_env("TOKENIZER", ""), help="target checkpoint dir (its tokenizer)")
        p.add_argument("--draft", default=_env("DRAFT", "127.0.0.1:50052"),
                       help="draft replicas: host:port[,host:port...] or dns:///NAME:PORT (every A/AAAA record)")
        p.add_argument("--verify", default=_env("VERIFY", "127.0.0.1:50053"),
                       help="verify replicas: host:port[,host:port...] or dns:///NAME:PORT (every A/AAAA record)")
        p.add_argument("--refresh", type=float, default=float(_env("REFRESH", "5")),
                       help="seconds between DNS re-resolutions and replica health checks")
        p.add_argument("--grace", type=float, default=float(_env("GRACE", "30")),
                       help="on SIGTERM, seconds running requests get to finish")
        p.add_argument("--host", default=_env("HOST", "127.0.0.1"))
        p.add_argument("--port", type=int, default=int(_env("PORT", "50051")))
        p.add_argument("--max-new-tokens-limit", type=int, default=int(_env("MAX_NEW_TOKENS_LIMIT", "4096")))
        p.add_argument("--default-policy", default=_env("DEFAULT_POLICY", "cast"))
        p.add_argument("--rpc-timeout", type=float, default=float(_env("RPC_TIMEOUT", "60")))
        defaults = CastParams()
        p.add_argument("--cast-c1", type=float, default=float(_env("CAST_C1", str(defaults.breadth_threshold))),
                       help="CAST breadth threshold C1")
        p.add_argument("--cast-c2", type=float, default=float(_env("CAST_C2", str(defaults.depth_threshold))),
                       help="CAST depth threshold C2")
        p.add_argument("--cast-c3", type=float, default=float(_env("CAST_C3", str(defaults.rerank_threshold))),
                       help="CAST reranking threshold C3")
        p.add_argument("--cast-r", type=int, default=int(_env("CAST_R", str(defaults.gain_buffer_size))),
                       help="CAST gain buffer size R")
        p.add_argument("--max-live", type=int, default=int(_env("MAX_LIVE", str(OrchestratorConfig.max_live))),
                       help="batch size limit (lowered to the replicas' slots; more requests wait in the queue)")
        p.add_argument("--max-queued", type=int, default=int(_env("MAX_QUEUED", "256")), help="queue limit")
        p.add_argument("--http-port", type=int, default=int(_env("HTTP_PORT", "-1")),
                       help="serve the OpenAI-compatible HTTP API and the demo page on this port too (default: off)")
        p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "0")),
                       help="serve Prometheus metrics at /metrics on this port (default 0: off)")
        a = p.parse_args(argv)
        if not a.tokenizer:
            p.error("--tokenizer (or CAST_ORCH_TOKENIZER) is required")
        return OrchestratorConfig(
            tokenizer_dir=Path(a.tokenizer),
            draft=a.draft,
            verify=a.verify,
            refresh_s=a.refresh,
            grace_s=a.grace,
            host=a.host,
            port=a.port,
            max_new_tokens_limit=a.max_new_tokens_limit,
            default_policy=a.default_policy,
            rpc_timeout_s=a.rpc_timeout,
            max_live=a.max_live,
            max_queued=a.max_queued,
            cast=CastParams(a.cast_c1, a.cast_c2, a.cast_c3, a.cast_r),
            http_port=None if a.http_port < 0 else a.http_port,
            metrics_port=a.metrics_port or None,
        )
