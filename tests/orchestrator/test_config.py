"""The orchestrator's flags and its dataclass agree on every default."""

from __future__ import annotations

from dataclasses import fields

from orchestrator.config import OrchestratorConfig


def test_flag_defaults_are_the_dataclass_defaults(tmp_path, monkeypatch):
    for name in ("MAX_LIVE", "MAX_QUEUED", "RPC_TIMEOUT", "PORT", "HOST", "DEFAULT_POLICY", "HTTP_PORT"):
        monkeypatch.delenv(f"CAST_ORCH_{name}", raising=False)
    from_flags = OrchestratorConfig.from_args(["--tokenizer", str(tmp_path)])
    plain = OrchestratorConfig(tokenizer_dir=tmp_path)
    for f in fields(OrchestratorConfig):
        if f.name not in ("connect_timeout_s",):  # not a flag
            assert getattr(from_flags, f.name) == getattr(plain, f.name), f.name
