"""The verify service's settings: flags, with CAST_VERIFY_* environment variables as fallbacks (cast_runtime.settings)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cast_runtime.settings import parse_settings, setting
from cast_runtime.tls import CertificateFiles, certificate_files

DTYPES = ("auto", "float64", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")  # "cuda:N" is accepted too


@dataclass
class VerifyConfig:
    model: Path = setting(help="local checkpoint directory of the target model (config, weights, tokenizer)")
    host: str = setting("0.0.0.0", "address to bind")
    port: int = setting(50053, "port to bind; 0: any free port")
    dtype: str = setting("auto", "one of " + ", ".join(DTYPES) + " (auto: bfloat16 on CUDA, float32 on CPU)")
    device: str = setting("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    max_context: int | None = setting(None, "tokens per sequence at most; default the model's max_position_embeddings")
    max_batch: int = setting(32, "KV slots: the most live sequences, so also the largest batch (more: RESOURCE_EXHAUSTED)")
    max_tree_tokens: int = setting(128, "the most nodes per tree in a Verify (more: INVALID_ARGUMENT)")
    session_ttl_s: float = setting(600.0, "seconds an idle sequence lives")
    model_name: str = setting("", "name reported by Describe; default the checkpoint directory's name")
    grace_s: float = setting(30.0, "on SIGTERM: NOT_SERVING, and calls answered this long while sequences are held")
    max_concurrent_rpcs: int | None = setting(None, "admission limit; extra calls get RESOURCE_EXHAUSTED")
    cost_table: Path | None = setting(None, "cost table for Describe (from `cast profile verify`); default cached or profiled")
    profile: bool = setting(True, "without --cost-table or a cached table, profile a small grid at start-up")
    metrics_port: int | None = setting(None, "serve Prometheus metrics at /metrics on this port; 0 or none: off")
    tls_cert: Path | None = setting(None, "PEM certificate chain: serve TLS only (reloaded when the file changes)")
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = setting(None, "PEM CA: require client certificates it signed (mutual TLS); others are "
                                               "refused at the handshake")

    tls: CertificateFiles | None = field(init=False, default=None, repr=False)  # from the tls_* settings

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port: {self.metrics_port} is outside 0..65535")
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
        if self.cost_table is not None:
            self.cost_table = Path(self.cost_table)
            if not self.cost_table.is_file():
                raise ValueError(f"cost_table: {self.cost_table} is not a file")
        self.tls = certificate_files(self.tls_cert, self.tls_key, self.tls_client_ca)

    @property
    def expire_interval_s(self) -> float:
        """How often idle sequences are looked for: often enough that one outlives its TTL by a quarter at most."""
        return min(10.0, self.session_ttl_s / 4)

    @staticmethod
    def from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> VerifyConfig:
        return parse_settings(VerifyConfig, argv, prog="cast serve verify",
                              description="CAST Serve verify service (the target model)", env_prefix="CAST_VERIFY_",
                              environ=environ)
