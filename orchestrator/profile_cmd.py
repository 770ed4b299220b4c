"""`cast profile verify|draft`: measure a service's cost table f(B, c, n) on this machine and write it as JSON.

    cast profile verify --model DIR [--quick] [--out FILE.json] [--plot FILE.png]
    cast profile draft  --model DIR [--level small|sparse [--layers N]] [--quick] [--out FILE.json] [--plot FILE.png]

By default the table goes where the service looks for it at start-up ($CAST_CACHE_DIR/cost-tables/, keyed by
device, model identity, dtype and backend), so a service started afterwards on this machine serves it; or pass
the file to the service with --cost-table. The measuring itself is verify_service/profile.py and
draft_service/profile.py.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from cast_core.cost_table import CostTable
from cast_runtime.profiling import Profile, ProfileGrid, describe_grid, model_identity, parse_ints, save_atomic


def add_grid_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="local checkpoint directory")
    p.add_argument("--batch-sizes", type=parse_ints, help="e.g. 1,2,4,8 (default: by device)")
    p.add_argument("--context-buckets", type=parse_ints, help="KV lengths, e.g. 128,512,1024 (capped by the model)")
    p.add_argument("--token-counts", type=parse_ints, help="new tokens per sequence, e.g. 1,2,4,8,16")
    p.add_argument("--repeats", type=int, help="timed forwards per cell (the fastest is kept)")
    p.add_argument("--warmup", type=int, help="untimed forwards per cell before those")
    p.add_argument("--quick", action="store_true", help="a small grid: seconds, for a smoke test")
    p.add_argument("--out", type=Path, help="JSON file to write (default: the service's cache entry)")
    p.add_argument("--plot", type=Path, help="also save the curves as a PNG (needs matplotlib)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def choose_grid(a: argparse.Namespace, default: ProfileGrid, quick: ProfileGrid) -> ProfileGrid:
    grid = quick if a.quick else default
    for name in ("batch_sizes", "context_buckets", "token_counts"):
        if getattr(a, name):
            grid = replace(grid, **{name: getattr(a, name)})
    return grid.with_timing(a.repeats, a.warmup)


class Progress:
    """on_cell(B, c, n, ms) for the profilers: a tqdm bar on stderr (or nothing)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, batch: int, context: int, tokens: int, ms: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"B={batch} c={context} n={tokens}: {ms:.2f} ms", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_table(table: CostTable) -> str:
    """ms per (B, n), one block per context bucket."""
    lines = []
    head = "".join(f"{n:>9}" for n in table.token_counts)
    for ci, context in enumerate(table.context_buckets):
        lines.append(f"c={context}  ms by n ->")
        lines.append(f"{'B':>6}{head}")
        for bi, batch in enumerate(table.batch_sizes):
            lines.append(f"{batch:>6}" + "".join(f"{ms:>9.2f}" for ms in table.millis[bi, ci]))
    return "\n".join(lines)


def plot_table(table: CostTable, path: Path, title: str = "") -> None:
    """ms vs n, one line per batch size, one panel per context bucket."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    panels = len(table.context_buckets)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4), sharey=True, squeeze=False)
    for ci, (ax, context) in enumerate(zip(axes[0], table.context_buckets)):
        for bi, batch in enumerate(table.batch_sizes):
            ax.plot(table.token_counts, table.millis[bi, ci], marker="o", markersize=3, label=f"B={batch}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(table.token_counts, [str(n) for n in table.token_counts])
        ax.set_title(f"context {context}")
        ax.set_xlabel("new tokens per sequence (n)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("ms per forward")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title or f"{table.model_id} on {table.device} ({table.dtype})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish(profile: Profile, out: Path, plot: Path | None, role: str) -> None:
    table = profile.table
    save_atomic(table, out)
    print(format_table(table))
    print(
        f"{role}: {table.model_id} on {table.device} ({table.dtype}): profiled {table.millis.size} cells, "
        f"{profile.forwards} forwards, in {profile.seconds:.1f} s"
    )
    print(f"wrote {out}")
    if plot is not None:
        plot_table(table, plot)
        print(f"plot {plot}")


def profile_verify(argv: list[str]) -> int:
    from verify_service import profile as vp
    from verify_service.config import DTYPES
    from verify_service.target import TargetModel
    from verify_service.verifier import Verifier

    p = argparse.ArgumentParser(prog="cast profile verify", description="Profile the target's S_T(B) table.")
    add_grid_flags(p)
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-context", type=int, help="as the service's --max-context (caps the context buckets)")
    p.add_argument("--model-name", default="", help="as the service's --model-name (part of the cache key)")
    p.add_argument("--max-batch", type=int, default=32, help="as the service's --max-batch (KV slots)")
    p.add_argument("--max-tree-tokens", type=int, default=128, help="as the service's --max-tree-tokens")
    a = p.parse_args(argv)
    target = TargetModel.load(a.model, dtype=a.dtype, device=a.device, max_context=a.max_context,
                              model_name=a.model_name)
    # Through a verifier as the service builds it: the table prices the forward it serves (CUDA graphs on CUDA).
    verifier = Verifier(target, max_batch=a.max_batch, session_ttl_s=3600, max_tree_tokens=a.max_tree_tokens)
    grid = choose_grid(a, vp.default_grid(target.device), vp.QUICK_GRID).capped(target.max_context)
    model_id = model_identity(target.model_name, a.model)
    print(f"profiling verify: {model_id} on {vp.device_name(target.device)} ({target.dtype_name}): "
          f"{describe_grid(grid)}", file=sys.stderr)
    progress = Progress(grid.cells, not a.no_progress)
    try:
        profile = vp.profile_verifier(verifier, grid, model_id=model_id, on_cell=progress, seed=a.seed)
    finally:
        progress.close()
    out = a.out or vp.verifier_cache_path(verifier, a.model)
    finish(profile, out, a.plot, "verify")
    return 0


def profile_draft(argv: list[str]) -> int:
    from draft_service import profile as dp
    from draft_service.export import DTYPES, export_draft
    from draft_service.runner import DraftRunner, choose_dtype, choose_provider

    p = argparse.ArgumentParser(prog="cast profile draft", description="Profile the draft's S_D(B) table.")
    add_grid_flags(p)
    p.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda"), help="onnxruntime provider")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="export dtype, as the service's --dtype (auto: float16 on CUDA, float32 on CPU)")
    p.add_argument("--top-k", type=int, default=8, help="as the service's --top-k (part of the graph)")
    p.add_argument("--cache-dir", type=Path, help="as the service's --cache-dir (default $CAST_CACHE_DIR)")
    p.add_argument("--level", choices=("small", "sparse"), default="small",
                   help="sparse: --model is a target; profile its sparse level (--layers), as the service serves it "
                        "with --draft-level sparse=DIR[,layers=N] (the table lands where the service reads it)")
    p.add_argument("--layers", type=int, default=0, help="the sparse level's layers (0: the service's default)")
    a = p.parse_args(argv)
    if a.level == "sparse":
        from draft_service.sparse import build_sparse_checkpoint, load_choice

        if load_choice(a.model) is None:
            a.model = build_sparse_checkpoint(a.model, a.layers, cache_dir=a.cache_dir)
    dtype = choose_dtype(a.dtype, choose_provider(a.provider))
    onnx_path, meta = export_draft(a.model, top_k=a.top_k, dtype=dtype, cache_dir=a.cache_dir)
    runner = DraftRunner(onnx_path, meta, provider=a.provider)
    grid = choose_grid(a, dp.default_grid(runner), dp.QUICK_GRID)
    if meta.max_context:
        grid = grid.capped(meta.max_context)
    model_id = dp.draft_model_id(a.model)
    print(f"profiling draft: {model_id} on {dp.device_name(runner.provider)} ({runner.backend}, {meta.dtype}): "
          f"{describe_grid(grid)}", file=sys.stderr)
    progress = Progress(grid.cells, not a.no_progress)
    try:
        profile = dp.profile_draft(runner, grid, model_id=model_id, on_cell=progress, seed=a.seed)
    finally:
        progress.close()
    out = a.out or dp.draft_cache_path(runner, a.model, a.cache_dir)
    finish(profile, out, a.plot, "draft")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("verify", "draft"):
        print(__doc__, file=sys.stderr)
        return 2
    return (profile_verify if argv[0] == "verify" else profile_draft)(argv[1:])
