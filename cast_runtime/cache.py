"""The one cache directory of a machine: ONNX exports, cost tables and the tiny random pair live under it."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$CAST_CACHE_DIR when set and not empty, else ~/.cache/cast-serve."""
    return Path(os.environ.get("CAST_CACHE_DIR") or Path.home() / ".cache" / "cast-serve")
