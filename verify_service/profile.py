"""Profile the verifier's cost table S_T(B): f(B, c, n) = ms of one target forward over B sequences x n new tokens
on a KV cache of c tokens each, through a Verifier's own store and tree forward (static_forward.py, CUDA graphs
included: they are captured in the warm-up runs and stay for serving), so the table prices the step it serves.

The KV is a real one (one prefill of c random tokens, copied into every slot of the batch); a timed forward
writes its n entries past the context and keeps none, so the next one sees the same. On CUDA every timing is
bracketed by synchronize().
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cast_core.cost_table import CostTable, monotone_envelope
from cast_runtime.profiling import (
    Profile, ProfileGrid, batch_sizes_up_to, cache_path, fastest_millis, model_identity, no_sync, select_startup_table,
)
from cast_core.tree import TokenTree
from verify_service.kv_cache import SequenceKV
from verify_service.static_forward import StaticForward
from verify_service.target import device_name
from verify_service.verifier import Verifier

log = logging.getLogger("verify_service")

# `cast profile verify` on a GPU: the grid the orchestrator's lookups span.
GPU_GRID = ProfileGrid(
    batch_sizes=(1, 2, 4, 8, 16, 32),
    context_buckets=(128, 512, 1024),
    token_counts=(1, 2, 4, 8, 16, 32, 48, 64, 96, 128),
    repeats=5,
    warmup=2,
)
# `cast profile verify` on a CPU: fewer, cheaper cells.
CPU_GRID = ProfileGrid(
    batch_sizes=(1, 2, 4, 8, 16),
    context_buckets=(128, 512, 1024),
    token_counts=(1, 2, 4, 8, 16, 32, 64, 128),
    repeats=3,
    warmup=1,
)
# `--quick`: a smoke test.
QUICK_GRID = ProfileGrid(
    batch_sizes=(1, 2, 4), context_buckets=(128,), token_counts=(1, 4, 16, 64), repeats=2, warmup=1
)
# At service start-up without a table: small, so that start-up stays short; its batch sizes reach the service's
# slots (`startup_grid`).
STARTUP_GRID = ProfileGrid(
    batch_sizes=(1, 2, 4, 8, 16, 32), context_buckets=(256,), token_counts=(1, 2, 4, 8, 16, 32, 64), repeats=2,
    warmup=1,
)


def default_grid(device: torch.device) -> ProfileGrid:
    return GPU_GRID if device.type == "cuda" else CPU_GRID


def sync_for(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else no_sync


def profile_tree(n: int) -> TokenTree:
    """A binary tree of n nodes (node i's parent is (i - 1) // 2): bushy like a draft's, depth ~log2(n)."""
    parents = np.array([-1] + [(i - 1) // 2 for i in range(1, n)], dtype=np.int64)
    depths = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        depths[i] = depths[parents[i]] + 1
    return TokenTree(np.zeros(n, dtype=np.int64), parents, depths, np.ones(n, dtype=np.float32))


@torch.no_grad()
def prefilled_batch(verifier: Verifier, context: int, batch: int, generator: torch.Generator) -> list[SequenceKV]:
    """`batch` sequences in the verifier's store (the caller frees them), each with the same KV over `context`
    random tokens (one prefill)."""
    target, store = verifier.target, verifier.kv
    kvs = [store.allocate() for _ in range(batch)]
    target.prefill(kvs[:1], [torch.randint(target.vocab_size, (context,), generator=generator).tolist()])
    for kv in kvs[1:]:
        store.copy_into(kvs[0], kv)
    return kvs


@torch.no_grad()
def time_tree_forward(forward: StaticForward, kvs: list[SequenceKV], tokens: int, grid: ProfileGrid,
                      generator: torch.Generator) -> float:
    """Fastest ms of one verify forward over len(kvs) trees of n nodes on top of kvs.

    tree_logits writes past the sequences' lengths and keeps nothing, so every run sees the same context."""
    target = forward.target
    tree = profile_tree(tokens)
    trees = [TokenTree(torch.randint(target.vocab_size, (tokens,), generator=generator).numpy(), tree.parents,
                       tree.depths, tree.values) for _ in kvs]
    return fastest_millis(lambda: forward.tree_logits(kvs, trees), grid.repeats, grid.warmup, sync_for(target.device))


def profile_verifier(
    verifier: Verifier,
    grid: ProfileGrid,
    model_id: str | None = None,
    on_cell: Callable[[int, int, int, float], None] | None = None,
    seed: int = 0,
) -> Profile:
    """Measure f(B, c, n) over the grid through the verifier. on_cell(B, c, n, ms) after each cell. Contexts are
    capped by the model's limit, batch sizes by the verifier's free slots and tree sizes by its tree room (it serves
    no more)."""
    target, static, store = verifier.target, verifier.static, verifier.kv
    free = store.slot_capacity - len(store.owners)
    if free < 1:
        raise ValueError("no free KV slot to profile in")
    grid = replace(grid, batch_sizes=tuple(b for b in grid.batch_sizes if b <= free) or (free,),
                   token_counts=tuple(n for n in grid.token_counts if n <= static.max_tree_tokens)
                   or (static.max_tree_tokens,))
    grid = grid.capped(target.max_context)
    generator = torch.Generator().manual_seed(seed)
    millis = np.zeros((len(grid.batch_sizes), len(grid.context_buckets), len(grid.token_counts)))
    start = time.perf_counter()
    forwards = 0
    max_batch = max(grid.batch_sizes)
    for ci, context in enumerate(grid.context_buckets):
        # Positions stay in range: a bucket at the model's limit runs on a slightly shorter context (same cost).
        room = profile_tree(max(grid.token_counts)).max_depth + 1
        kvs = prefilled_batch(verifier, min(context, target.max_context - room), max_batch, generator)
        forwards += 1
        for bi, batch in enumerate(grid.batch_sizes):
            for ni, tokens in enumerate(grid.token_counts):
                # The first `batch` slots: consecutive, as a Verify over all live sequences runs.
                ms = time_tree_forward(static, kvs[:batch], tokens, grid, generator)
                millis[bi, ci, ni] = max(ms, 1e-6)  # the table needs > 0; a timer can read 0 for tiny work
                forwards += grid.repeats + grid.warmup
                if on_cell is not None:
                    on_cell(batch, context, tokens, ms)
        for kv in reversed(kvs):  # the last slot first: nothing moves
            kv.free()
        del kvs
    if target.device.type == "cuda":
        torch.cuda.empty_cache()  # the profile's KV copies are not the service's to keep
    table = CostTable(
        device=device_name(target.device),
        model_id=model_id or target.model_name,
        dtype=target.dtype_name,
        batch_sizes=grid.batch_sizes,
        context_buckets=grid.context_buckets,
        token_counts=grid.token_counts,
        millis=monotone_envelope(millis),
    )
    return Profile(table, time.perf_counter() - start, forwards)


def verifier_cache_path(verifier: Verifier, model_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where a table profiled through this verifier is kept: by device, model, dtype, attention kernel, CUDA graphs
    or not, and the limits that cap its grid (slots, tree room, context)."""
    target, static = verifier.target, verifier.static
    extra = (f"attn={target.attn_implementation},graphs={int(static.use_graphs)},slots={verifier.kv.slot_capacity},"
             f"tree_tokens={static.max_tree_tokens},max_context={target.max_context}")
    return cache_path("verify", device_name(target.device), model_identity(target.model_name, model_dir),
                      target.dtype_name, extra=extra, cache_dir=cache_dir)


def startup_grid(verifier: Verifier) -> ProfileGrid:
    """STARTUP_GRID with batch sizes up to the verifier's slots, the largest batch it serves."""
    return replace(STARTUP_GRID, batch_sizes=batch_sizes_up_to(verifier.kv.slot_capacity))


def startup_cost_table(config, verifier: Verifier) -> CostTable | None:
    """The table Describe reports (config: a VerifyConfig): --cost-table, else cached, else a small profile through
    the verifier, cached."""
    target = verifier.target
    model_id = model_identity(target.model_name, config.model)
    return select_startup_table(
        config.cost_table,
        config.profile,
        verifier_cache_path(verifier, config.model),
        lambda: profile_verifier(verifier, startup_grid(verifier), model_id=model_id),
        device_name(target.device),
        model_id,
        log,
    )
