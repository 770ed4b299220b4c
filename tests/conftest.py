"""Shared fixtures: a tiny random target/draft pair with one tokenizer, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cast_models.tiny import make_tiny_pair


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(target_dir, draft_dir): tiny random Llama models sharing one BPE tokenizer."""
    return make_tiny_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session", autouse=True)
def onnx_cache_dir(tmp_path_factory) -> Path:
    """Where draft exports and profiled cost tables are cached during the test session (kept out of the user's
    cache). Autouse: every service a test starts, in process or not, profiles into it."""
    path = tmp_path_factory.mktemp("onnx-cache")
    os.environ["CAST_CACHE_DIR"] = str(path)
    return path
