"""Fixtures for the draft service tests: one export per session (the tiny target drafting for itself)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cast_runtime.sessions import SessionStore
from draft_service.expansion import Expander
from draft_service.export import ExportMeta, export_draft
from draft_service.runner import DraftRunner


@pytest.fixture(scope="session")
def draft_model_dir(tiny_pair) -> Path:
    """The target checkpoint used as the draft: its greedy path is known from HF generate()."""
    return tiny_pair[0]


@pytest.fixture(scope="session")
def exported(draft_model_dir, onnx_cache_dir) -> tuple[Path, ExportMeta]:
    return export_draft(draft_model_dir, top_k=8, dtype="float32")


@pytest.fixture(scope="session")
def wide_exported(tmp_path_factory, onnx_cache_dir) -> tuple[Path, ExportMeta]:
    """A random draft 512 wide (2 layers, 20 MiB of weights): a session's own memory is small beside its weights."""
    import torch
    from transformers import LlamaForCausalLM

    from cast_models.tiny import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(512, hidden=512, layers=2, heads=4, kv_heads=2, eos_id=0))
    path = tmp_path_factory.mktemp("wide-draft")
    model.save_pretrained(path)
    return export_draft(path, top_k=8, dtype="float32")


@pytest.fixture(scope="session")
def runner(exported) -> DraftRunner:
    """The CPU default: buffers that grow with the longest sequence, one session of free shapes."""
    return DraftRunner(*exported, provider="cpu")


@pytest.fixture(scope="session")
def fixed_runner(exported) -> DraftRunner:
    """The CUDA default on the CPU provider: fixed buffers and a session per (batch, tokens) bucket, without the
    graphs."""
    return DraftRunner(*exported, provider="cpu", fixed_buffers=True)


@pytest.fixture(params=["growing", "fixed"])
def make_expander(request, runner, fixed_runner):
    """make_expander(max_sessions=8, ttl_s=60, max_context=model's) -> a fresh Expander (its own sessions) over
    growing or fixed buffers: every test using it runs with both."""
    chosen = runner if request.param == "growing" else fixed_runner

    def make(max_sessions: int = 8, ttl_s: float = 60.0, max_context: int | None = None) -> Expander:
        return Expander(chosen, SessionStore(max_sessions, ttl_s), max_context or chosen.meta.max_context)

    return make
