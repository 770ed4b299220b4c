"""The draft service's settings: flags, with CAST_DRAFT_* environment variables as fallbacks (cast_runtime.settings)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cast_runtime.cache import default_cache_dir
from cast_runtime.settings import parse_settings, setting
from cast_runtime.tls import CertificateFiles, certificate_files
from draft_service.export import DTYPES
from draft_service.levels import LevelSpec, parse_level

PROVIDERS = ("auto", "cpu", "cuda")


@dataclass
class DraftConfig:
    model: Path | None = setting(None, "local checkpoint directory of the draft (transformers format): level small; "
                                       "optional when --draft-level gives a model level")
    host: str = setting("0.0.0.0", "address to bind")
    port: int = setting(50052, "port to bind; 0: any free port")
    provider: str = setting("auto", "ONNX Runtime provider: auto (CUDA when the installed onnxruntime has it), cpu, cuda")
    top_k: int = setting(8, "K fused into the exported graph: the most children a node can propose")
    dtype: str = setting("auto", "export dtype: float32, float16, auto (float16 on CUDA, float32 on CPU)")
    cache_dir: Path | None = setting(None, "export and cost-table cache; default $CAST_CACHE_DIR or ~/.cache/cast-serve")
    max_sessions: int = setting(1024, "live sequences at most")
    max_batch: int = setting(16, "sequences per Expand whose KV memory (CPU) is reserved at start-up, at the full "
                                 "context; a larger batch runs, on memory of its own")
    session_ttl_s: float = setting(600.0, "seconds an idle sequence lives")
    max_context: int = setting(0, "tokens per sequence at most; 0: the model's max_position_embeddings")
    grace_s: float = setting(30.0, "on SIGTERM: NOT_SERVING, and calls answered this long while sequences are held")
    cost_table: Path | None = setting(None, "cost table for Describe (from `cast profile draft`); default cached or profiled")
    profile: bool = setting(True, "without --cost-table or a cached table, profile a small grid at start-up")
    tls_cert: Path | None = setting(None, "PEM certificate chain: serve TLS only (reloaded when the file changes)")
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = setting(None, "PEM CA: require client certificates it signed (mutual TLS); others are "
                                               "refused at the handshake")
    threads: int = setting(0, "ONNX Runtime intra-op threads; 0: one per physical core of the host, which in a "
                              "container may be more than its CPU limit")
    metrics_port: int | None = setting(None, "serve Prometheus metrics at /metrics on this port; 0 or none: off")
    draft_level: tuple[str, ...] = setting((), "another draft level, NAME=SPEC (draft_service/levels.py): small=DIR, "
                                               "sparse=TARGET_DIR[,layers=N], lookup")

    tls: CertificateFiles | None = field(init=False, default=None, repr=False)  # from the tls_* settings
    levels: tuple[LevelSpec, ...] = field(init=False, default=(), repr=False)  # --model as small, then --draft-level

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port: {self.metrics_port} is outside [0, 65535]")
        self.cache_dir = Path(self.cache_dir or default_cache_dir())
        if self.model is not None:
            self.model = Path(self.model)
            if not (self.model / "config.json").is_file():
                raise ValueError(f"model: {self.model} is not a checkpoint directory (no config.json)")
        small = (LevelSpec("small", self.model),) if self.model is not None else ()
        self.levels = small + tuple(parse_level(text) for text in self.draft_level)
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
        if self.max_batch < 1:
            raise ValueError(f"max_batch: {self.max_batch} must be >= 1")
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
        self.tls = certificate_files(self.tls_cert, self.tls_key, self.tls_client_ca)

    @staticmethod
    def from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> DraftConfig:
        return parse_settings(DraftConfig, argv, prog="cast serve draft", description="CAST Serve draft-model service",
                              env_prefix="CAST_DRAFT_", environ=environ)
