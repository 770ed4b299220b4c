"""Profile the draft's cost table S_D(B): f(B, c, n) = ms of one ORT run with batch B, c committed tokens and n new
tokens in a binary tree, as one layer of a batched expansion runs it.

The KV in the buffers is whatever is there (ORT's cost does not depend on its values). DraftRunner.run is
synchronous (the top-K are on the host when it returns, the device work included), so a wall-clock timer around it
is enough, on the CUDA provider too. No torch here: a cached draft start stays torch-free.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cast_core.cost_table import CostTable, monotone_envelope
from cast_runtime.profiling import (
    Profile, ProfileGrid, cache_path, fastest_millis, model_identity, no_sync, select_startup_table,
)
from draft_service.export import ROW_FIELDS
from draft_service.runner import DraftRunner

log = logging.getLogger(__name__)

GPU_GRID = ProfileGrid(
    batch_sizes=(1, 2, 4, 8, 16, 32),
    context_buckets=(128, 512, 1024),
    token_counts=(1, 2, 4, 8, 16, 32, 64),
    repeats=5,
    warmup=2,
)
CPU_GRID = GPU_GRID.with_timing(repeats=3, warmup=1)  # the same cells; a CPU forward is slower, fewer repeats
QUICK_GRID = ProfileGrid(
    batch_sizes=(1, 2, 4), context_buckets=(128,), token_counts=(1, 4, 16, 64), repeats=2, warmup=1
)
# Rows are looked up at the committed length plus the tree so far (orchestrator/costs.py): two buckets. Batch sizes
# up to a verifier's default slots (32): past the last, a step is priced as one at that batch size.
STARTUP_GRID = ProfileGrid(
    batch_sizes=(1, 2, 4, 8, 16, 32), context_buckets=(128, 512), token_counts=(1, 2, 4, 8, 16, 32, 64), repeats=2,
    warmup=1,
)


def default_grid(runner: DraftRunner) -> ProfileGrid:
    return GPU_GRID if runner.provider == "CUDAExecutionProvider" else CPU_GRID


@functools.cache  # one nvidia-smi call per process
def device_name(provider: str) -> str:
    """"cpu", or the GPU's name as nvidia-smi gives it (ORT does not say); "cuda:0" when it cannot be asked."""
    if provider != "CUDAExecutionProvider":
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"  # ORT's device 0
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", visible],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "cuda:0"
    return out.splitlines()[0].strip() if out else "cuda:0"


def tree_rows(runner: DraftRunner, batch: int, context: int, tokens: int, rng: np.random.Generator) -> np.ndarray:
    """[B, n, W] rows of a binary tree of n nodes on top of c committed tokens: node i at column c + i, seeing the
    committed columns, its ancestors and itself."""
    columns = context + np.arange(tokens)
    depths = np.floor(np.log2(np.arange(tokens) + 1)).astype(np.int64)
    rows = runner.padding_rows(batch, tokens)
    rows[..., 0] = rng.integers(0, runner.meta.vocab_size, size=(batch, tokens))
    rows[..., 1] = context + depths
    rows[..., 2] = columns
    rows[..., 3] = context
    rows[..., ROW_FIELDS:] = columns[:, None]
    for i in range(1, tokens):  # ancestors: halve the index down to the root
        node, a = i, 1
        while node > 0 and a < rows.shape[2] - ROW_FIELDS:
            node = (node - 1) // 2
            rows[:, i, ROW_FIELDS + a] = columns[node]
            a += 1
    return rows


def time_forward(runner: DraftRunner, batch: int, context: int, tokens: int, grid: ProfileGrid,
                 rng: np.random.Generator) -> float:
    """Median ms of one runner.run (a replayed CUDA graph on CUDA: the first run, the capture, is warm-up)."""
    runner.reserve(batch, context + tokens - 1, shrink=True)  # growing buffers: as wide as serving c would make them
    rows = tree_rows(runner, batch, context, tokens, rng)
    return fastest_millis(lambda: runner.run(rows), grid.repeats, max(grid.warmup, 2), no_sync)


def profile_draft(
    runner: DraftRunner,
    grid: ProfileGrid,
    model_id: str | None = None,
    on_cell: Callable[[int, int, int, float], None] | None = None,
    seed: int = 0,
) -> Profile:
    """Measure f(B, c, n) over the grid (contexts capped by the model's limit). on_cell(B, c, n, ms) after each cell."""
    meta = runner.meta
    if meta.max_context:
        grid = grid.capped(meta.max_context)
    rng = np.random.default_rng(seed)
    millis = np.zeros((len(grid.batch_sizes), len(grid.context_buckets), len(grid.token_counts)))
    start = time.perf_counter()
    forwards = 0
    for ci, context in enumerate(grid.context_buckets):
        for bi, batch in enumerate(grid.batch_sizes):
            for ni, tokens in enumerate(grid.token_counts):
                ms = time_forward(runner, batch, context, tokens, grid, rng)
                millis[bi, ci, ni] = max(ms, 1e-6)  # the table needs > 0
                forwards += grid.repeats + max(grid.warmup, 2)
                if on_cell is not None:
                    on_cell(batch, context, tokens, ms)
    table = CostTable(
        device=device_name(runner.provider),
        model_id=model_id or Path(meta.model_dir).name,
        dtype=meta.dtype,
        batch_sizes=grid.batch_sizes,
        context_buckets=grid.context_buckets,
        token_counts=grid.token_counts,
        millis=monotone_envelope(millis),
    )
    return Profile(table, time.perf_counter() - start, forwards)


def draft_model_id(model_dir: str | Path) -> str:
    return model_identity(Path(model_dir).resolve().name, model_dir)


def draft_cache_path(runner: DraftRunner, model_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where this (device, model, dtype, provider, top-K) keeps its profiled table."""
    return cache_path(
        "draft", device_name(runner.provider), draft_model_id(model_dir), runner.meta.dtype,
        extra=f"{runner.backend}/top_k={runner.meta.top_k}", cache_dir=cache_dir,
    )


def startup_cost_table(runner: DraftRunner, config) -> CostTable | None:
    """The table Describe reports (config: a DraftConfig): --cost-table, else cached, else a small profile, cached."""
    model_id = draft_model_id(config.model)
    return select_startup_table(
        config.cost_table,
        config.profile,
        draft_cache_path(runner, config.model, config.cache_dir),
        lambda: profile_draft(runner, STARTUP_GRID, model_id=model_id),
        device_name(runner.provider),
        model_id,
        log,
    )
