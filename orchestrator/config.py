"""The orchestrator's settings: flags, with CAST_ORCH_* environment variables as fallbacks (cast_runtime.settings)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cast_core.errors import InvalidArgument
from cast_core.selection import CastParams
from cast_runtime.settings import parse_settings, setting
from cast_runtime.tls import CertificateFiles, certificate_files, channel_credentials
from orchestrator.auth import TokenFile
from orchestrator.discovery import Target, parse_target


@dataclass
class OrchestratorConfig:
    tokenizer_dir: Path = setting(help="the target checkpoint directory (its tokenizer)", flag="--tokenizer",
                                  env="TOKENIZER")
    draft: str = setting("127.0.0.1:50052", "draft replicas: host:port[,host:port...] or dns:///NAME:PORT (every "
                                            "A/AAAA record)")
    verify: str = setting("127.0.0.1:50053", "verify replicas, likewise")
    host: str = setting("127.0.0.1", "address to bind")
    port: int = setting(50051, "port of the gRPC API; 0: any free port")
    http_port: int | None = setting(None, "serve the OpenAI-compatible HTTP API and the demo page on this port too; "
                                          "empty: off")
    metrics_port: int | None = setting(None, "serve Prometheus metrics at /metrics on this port; 0 or empty: off")
    max_new_tokens_limit: int = setting(4096, "larger requests are OUT_OF_RANGE")
    default_policy: str = setting("cast", "policy of a request that names none")
    rpc_timeout_s: float = setting(60.0, "seconds per downstream call", flag="--rpc-timeout", env="RPC_TIMEOUT")
    max_live: int = setting(64, "sequences decoded together at most; start-up lowers it to the slots the replicas "
                                "report (Describe: max_sequences)")
    max_queued: int = setting(256, "requests waiting beyond the batch; past it, RESOURCE_EXHAUSTED at once")
    refresh_s: float = setting(5.0, "seconds between DNS re-resolutions and replica health checks", flag="--refresh",
                               env="REFRESH")
    grace_s: float = setting(30.0, "on SIGTERM, seconds running requests get to finish", flag="--grace", env="GRACE")
    cast_c1: float = setting(CastParams.breadth_threshold, "CAST breadth threshold C1")
    cast_c2: float = setting(CastParams.depth_threshold, "CAST depth threshold C2")
    cast_c3: float = setting(CastParams.rerank_threshold, "CAST reranking threshold C3")
    cast_r: int = setting(CastParams.gain_buffer_size, "CAST gain buffer size R")
    pipeline: bool = setting(False, "on: while a step's Verify runs, the draft prepares the next step's tree from "
                                    "the outcome it predicts (used when the prediction comes true); off: draft, then "
                                    "verify. Off by default: it won only at batch 1 with the draft on its own hardware "
                                    "(reports/pipeline/)")
    tls_cert: Path | None = setting(None, "PEM certificate chain of the public APIs (gRPC and HTTP): TLS only; the gRPC "
                                          "API reloads it when the file changes")
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert")
    tls_ca: Path | None = setting(None, "PEM CA of the draft and verify replicas' certificates: call them over TLS")
    tls_client_cert: Path | None = setting(None, "PEM certificate shown to the replicas (mutual TLS: their "
                                                 "--tls-client-ca signed it)")
    tls_client_key: Path | None = setting(None, "PEM private key of --tls-client-cert")
    auth_tokens: Path | None = setting(None, "token file (one token and a client name per line): the public APIs "
                                             "require 'authorization: Bearer TOKEN'; empty: open")
    client_max_live: int = setting(0, "with --auth-tokens: requests of one client decoded at once; 0: no limit")
    client_max_queued: int = setting(0, "with --auth-tokens and --client-max-live: more requests of one client that "
                                        "wait; past them, RESOURCE_EXHAUSTED")
    connect_timeout_s: float = 600.0         # how long start-up waits for the draft and verify services (on one host
                                             # they start one after the other: cast_runtime/cache.py)
    draft_target: Target = field(init=False, repr=False)   # parsed from `draft`
    verify_target: Target = field(init=False, repr=False)  # parsed from `verify`
    cast: CastParams = field(init=False)                   # C1, C2, C3 and R of the `cast` policy
    tls: CertificateFiles | None = field(init=False, repr=False)                 # from tls_cert, tls_key
    replica_credentials: grpc.ChannelCredentials | None = field(init=False, repr=False)  # from tls_ca, tls_client_*
    tokens: TokenFile | None = field(init=False, repr=False)                     # from auth_tokens

    def __post_init__(self) -> None:
        self.tokenizer_dir = Path(self.tokenizer_dir)
        self.draft_target = parse_target(self.draft, "draft")
        self.verify_target = parse_target(self.verify, "verify")
        self.cast = CastParams(self.cast_c1, self.cast_c2, self.cast_c3, self.cast_r)
        if self.refresh_s <= 0 or self.grace_s < 0:
            raise ValueError("refresh_s must be positive and grace_s not negative")
        for name in ("port", "http_port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 65536:
                raise ValueError(f"{name} {value} is out of range")
        from orchestrator.policies import resolve_policy

        try:
            resolve_policy(self.default_policy, "")
        except InvalidArgument as exc:
            raise ValueError(f"default {exc}") from None
        if self.max_live < 1 or self.max_queued < 0:
            raise ValueError("max_live must be at least 1 and max_queued at least 0")
        if self.max_new_tokens_limit < 1:
            raise ValueError("max_new_tokens_limit must be at least 1")
        self.tls = certificate_files(self.tls_cert, self.tls_key)
        if self.tls_ca is None and (self.tls_client_cert or self.tls_client_key):
            raise ValueError("tls_client_cert and tls_client_key need tls_ca (mutual TLS runs over TLS)")
        self.replica_credentials = (channel_credentials(self.tls_ca, self.tls_client_cert, self.tls_client_key)
                                    if self.tls_ca is not None else None)
        self.tokens = TokenFile(self.auth_tokens) if self.auth_tokens is not None else None
        if self.client_max_live < 0 or self.client_max_queued < 0:
            raise ValueError("client_max_live and client_max_queued must not be negative")

    @staticmethod
    def from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> OrchestratorConfig:
        return parse_settings(OrchestratorConfig, argv, prog="cast serve orchestrator",
                              description="The public Generate service.", env_prefix="CAST_ORCH_", environ=environ)
