"""Fixtures for the draft service tests: one export per session (the tiny target drafting for itself)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cast_runtime.sessions import SessionStore
from draft_service.expansion import Expander
from draft_service.export import ExportMeta, export_draft
from draft_service.runner import DraftRunner
from draft_service.static_runner import StaticRunner


@pytest.fixture(scope="session")
def draft_model_dir(tiny_pair) -> Path:
    """The target checkpoint used as the draft: its greedy path is known from HF generate()."""
    return tiny_pair[0]


@pytest.fixture(scope="session")
def exported(draft_model_dir, onnx_cache_dir) -> tuple[Path, ExportMeta]:
    return export_draft(draft_model_dir, top_k=8, dtype="float32")


@pytest.fixture(scope="session")
def runner(exported) -> DraftRunner:
    return DraftRunner(*exported, provider="cpu")


@pytest.fixture(scope="session")
def static_exported(draft_model_dir, onnx_cache_dir) -> tuple[Path, ExportMeta]:
    return export_draft(draft_model_dir, top_k=8, dtype="float32", layout="static")


@pytest.fixture(scope="session")
def static_runner(static_exported) -> StaticRunner:
    """The static layout on the CPU provider: the same buckets and buffers as on CUDA, without the graphs."""
    return StaticRunner(*static_exported, provider="cpu")


@pytest.fixture(params=["host", "device"])
def make_expander(request, runner, static_runner):
    """make_expander(max_sessions=8, ttl_s=60, max_context=model's) -> a fresh Expander (its own sessions), with the
    KV on the host (DraftRunner) or in device buffers (StaticRunner): every test using it runs with both."""
    chosen = runner if request.param == "host" else static_runner

    def make(max_sessions: int = 8, ttl_s: float = 60.0, max_context: int | None = None) -> Expander:
        return Expander(chosen, SessionStore(max_sessions, ttl_s), max_context or chosen.meta.max_context)

    return make
