"""Profile the verifier's cost table S_T(B): f(B, c, n) = ms of one target forward over B sequences x n new tokens
on a KV cache of c tokens each, with a tree-shaped 4D mask, as a batched verify step runs it.

The KV is a real one (one prefill of c random tokens, repeated over the batch); each timed forward appends n
entries, which are cropped off again before the next. On CUDA every timing is bracketed by synchronize().
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cast_core.cost_table import CostTable
from cast_core.profiling import (
    Profile, ProfileGrid, cache_path, median_millis, model_identity, no_sync, select_startup_table,
)
from cast_core.tree import TokenTree
from verify_service.kv_cache import SequenceKV
from verify_service.target import TargetModel, device_name, tree_attention_mask

log = logging.getLogger("verify_service")

# `cast profile verify` on a GPU: the grid the orchestrator's lookups span.
GPU_GRID = ProfileGrid(
    batch_sizes=(1, 2, 4, 8, 16, 32),
    context_buckets=(128, 512, 1024),
    token_counts=(1, 2, 4, 8, 16, 32, 48, 64, 96, 128),
    repeats=5,
    warmup=2,
)
# `cast profile verify` on a CPU: fewer, cheaper cells, so the reference target takes about a minute.
CPU_GRID = ProfileGrid(
    batch_sizes=(1, 2, 4, 8, 16),
    context_buckets=(128, 512, 1024),
    token_counts=(1, 2, 4, 8, 16, 32, 64, 128),
    repeats=3,
    warmup=1,
)
# `--quick`: a few seconds anywhere.
QUICK_GRID = ProfileGrid(
    batch_sizes=(1, 2, 4), context_buckets=(128,), token_counts=(1, 4, 16, 64), repeats=2, warmup=1
)
# At service start-up without a table: small, a few seconds on CPU for the tiny and reference models.
STARTUP_GRID = ProfileGrid(
    batch_sizes=(1, 2, 4, 8), context_buckets=(256,), token_counts=(1, 2, 4, 8, 16, 32, 64), repeats=2, warmup=1
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
def prefilled_kv(target: TargetModel, context: int, generator: torch.Generator) -> SequenceKV:
    """One sequence's KV cache over `context` random tokens."""
    kv = SequenceKV()
    ids = torch.randint(target.vocab_size, (context,), generator=generator).tolist()
    target.prefill(kv, ids)
    return kv


def batched_copy(cache, batch: int):
    """A copy of a one-sequence cache with every layer repeated over the batch: [1, H_kv, c, D] -> [B, H_kv, c, D]."""
    out = copy.deepcopy(cache)
    for layer in out.layers:  # by hand: DynamicCache's own helpers changed meaning across transformers 5.x
        layer.keys = layer.keys.repeat_interleave(batch, dim=0)
        layer.values = layer.values.repeat_interleave(batch, dim=0)
    return out


def truncate(cache, length: int) -> None:
    """Keep the first `length` entries of every layer (views: the next forward's append copies anyway)."""
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


@torch.no_grad()
def time_tree_forward(target: TargetModel, cache, batch: int, context: int, tokens: int, grid: ProfileGrid,
                      generator: torch.Generator) -> float:
    """Median ms of one batched forward: B x n tree nodes on top of `cache` ([B, H_kv, c, D] per layer)."""
    device = target.device
    tree = profile_tree(tokens)
    ids = torch.randint(target.vocab_size, (batch, tokens), generator=generator).to(device)  # [B, n]
    # Clamped to the last position: a bucket at the model's limit still runs (same cost, valid positions).
    depths = torch.from_numpy(tree.depths).to(device)
    positions = (context + depths).clamp(max=target.max_context - 1)[None].expand(batch, -1)  # [B, n]
    mask = tree_attention_mask(context, tree, target.dtype, device).expand(batch, -1, -1, -1).contiguous()
    # mask: [B, 1, n, c + n], one per sequence as a batched verify would pass it

    def forward() -> None:
        target.model(
            input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
            **{target.cache_kwarg: cache},
        )  # logits [B, n, V]: every node's, as tree_logits needs them
        truncate(cache, context)  # drop the n appended entries: the next run sees the same c

    return median_millis(forward, grid.repeats, grid.warmup, sync_for(device))


def profile_target(
    target: TargetModel,
    grid: ProfileGrid,
    model_id: str | None = None,
    on_cell: Callable[[int, int, int, float], None] | None = None,
    seed: int = 0,
) -> Profile:
    """Measure f(B, c, n) over the grid (contexts capped by the model's limit). on_cell(B, c, n, ms) after each cell."""
    grid = grid.capped(target.max_context)
    generator = torch.Generator().manual_seed(seed)
    millis = np.zeros((len(grid.batch_sizes), len(grid.context_buckets), len(grid.token_counts)))
    start = time.perf_counter()
    forwards = 0
    for ci, context in enumerate(grid.context_buckets):
        base = prefilled_kv(target, context, generator)
        forwards += 1
        for bi, batch in enumerate(grid.batch_sizes):
            cache = batched_copy(base.cache, batch)
            for ni, tokens in enumerate(grid.token_counts):
                ms = time_tree_forward(target, cache, batch, context, tokens, grid, generator)
                millis[bi, ci, ni] = max(ms, 1e-6)  # the table needs > 0; a timer can read 0 for tiny work
                forwards += grid.repeats + grid.warmup
                if on_cell is not None:
                    on_cell(batch, context, tokens, ms)
            del cache
        del base
    if target.device.type == "cuda":
        torch.cuda.empty_cache()  # the profile's KV copies are not the service's to keep
    table = CostTable(
        device=device_name(target.device),
        model_id=model_id or target.model_name,
        dtype=target.dtype_name,
        batch_sizes=grid.batch_sizes,
        context_buckets=grid.context_buckets,
        token_counts=grid.token_counts,
        millis=millis,
    )
    return Profile(table, time.perf_counter() - start, forwards)


def target_cache_path(target: TargetModel, model_dir: str | Path, attn_implementation: str,
                      cache_dir: str | Path | None = None) -> Path:
    """Where this (device, model, dtype, attention kernel) keeps its profiled table."""
    return cache_path(
        "verify", device_name(target.device), model_identity(target.model_name, model_dir), target.dtype_name,
        extra=f"attn={attn_implementation}", cache_dir=cache_dir,
    )


def startup_cost_table(target: TargetModel, config) -> CostTable | None:
    """The table Describe reports (config: a VerifyConfig): --cost-table, else cached, else a small profile, cached."""
    model_id = model_identity(target.model_name, config.model)
    return select_startup_table(
        config.cost_table,
        config.profile,
        target_cache_path(target, config.model, config.attn_implementation),
        lambda: profile_target(target, STARTUP_GRID, model_id=model_id),
        device_name(target.device),
        model_id,
        log,
    )
