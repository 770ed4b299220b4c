"""Time one Expand of a full EAGLE-2-like tree, in process (Expander, no gRPC).

    python -m benchmarks.draft_step --model models/reference/draft --provider cuda --batch 1,8 --depth 6 \\
        --top-k 8 --breadth 8 --context 256 --out draft_step.json

Per batch cell: B sequences are prefilled to `context - new_tokens` committed tokens; each timed call commits
`new_tokens` more (the tree's root at position `context - 1`) and grows the tree to `depth` layers, `breadth` nodes
kept per layer, `top_k` children each; then the sessions are cut back to where they were, so every call sees the
same context. Reports the median over `repeats` calls after `warmup` and the time inside the ORT runs.

`--rules eagle2,cast` also times each cell with CAST's breadth and depth rules on, at zero thresholds and free
prices: the same tree, so the difference is what the rules themselves cost per Expand. `--buffers fixed,growing`
times both buffer modes of the runner (runner.py; the provider's default otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cast_core.cost_table import NormalizedCostSlice
from cast_runtime.sessions import SessionStore
from draft_service.expansion import Budget, CastBudget, Expander, SequenceInput
from draft_service.export import export_draft
from draft_service.profile import device_name
from draft_service.runner import DraftRunner, choose_dtype, choose_provider


def time_expand(runner: DraftRunner, batch: int, context: int, new_tokens: int, budget: Budget, repeats: int,
                warmup: int, seed: int = 0) -> dict:
    """One cell: the median wall and model ms of Expand over `repeats` calls."""
    meta = runner.meta
    expander = Expander(runner, SessionStore(batch, ttl_s=1e9), meta.max_context or context)
    rng = np.random.default_rng(seed)
    ids = [f"s{b}" for b in range(batch)]
    start = context - new_tokens
    prompt = Budget(top_k=budget.top_k, max_depth=0, max_breadth=budget.max_breadth)  # commit only
    expander.expand([SequenceInput(s, rng.integers(0, meta.vocab_size, start, dtype=np.int64), 0) for s in ids],
                    prompt)
    step = [SequenceInput(s, rng.integers(0, meta.vocab_size, new_tokens, dtype=np.int64), start) for s in ids]
    wall, model, nodes, layers = [], [], 0, 0
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        out, model_seconds = expander.expand(step, budget)
        elapsed = time.perf_counter() - t0
        for s in ids:  # back to `start` committed tokens: the next call appends the same columns again
            expander.rewind(s, start)
        if i >= warmup:
            wall.append(elapsed * 1e3)
            model.append(model_seconds * 1e3)
        nodes, layers = len(out[0].tree), len(out[0].layers)
    return {
        "batch": batch,
        "rules": "cast" if budget.cast is not None else "eagle2",
        "buffers": "fixed" if runner.fixed_buffers else "growing",
        "backend": runner.backend,
        "median_ms": float(np.median(wall)),
        "p10_ms": float(np.percentile(wall, 10)),
        "p90_ms": float(np.percentile(wall, 90)),
        "model_median_ms": float(np.median(model)),
        "nodes_per_tree": nodes,
        "layers": layers,
    }


def with_free_cast_rules(budget: Budget) -> Budget:
    """The budget with CAST's rules on but unable to prune: thresholds 0, every forward ~free. Same tree."""
    free = NormalizedCostSlice((1,), (1,), np.full((1, 1), 1e-9))
    return replace(budget, cast=CastBudget(free, breadth_threshold=0.0, depth_threshold=0.0, gain_mean=1.0))


def parse_list(text: str, item=int) -> list:
    return [item(x.strip()) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.draft_step", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path, help="draft checkpoint directory (transformers format)")
    p.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16"),
                   help="auto: float16 on CUDA, float32 on CPU")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--depth", type=int, default=6, help="tree layers")
    p.add_argument("--top-k", type=int, default=8, help="children per kept node (also the exported K)")
    p.add_argument("--breadth", type=int, default=8, help="nodes kept per layer")
    p.add_argument("--context", type=int, default=256, help="committed tokens before the tree's root, root included")
    p.add_argument("--new-tokens", type=int, default=1, help="tokens each timed call commits (accepted + bonus)")
    p.add_argument("--rules", default="eagle2", help="eagle2, cast or eagle2,cast: the tree rules timed (see above)")
    p.add_argument("--buffers", default="", help="fixed, growing or fixed,growing (default: the provider's)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per cell (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    p.add_argument("--cache-dir", type=Path, default=None, help="export cache ($CAST_CACHE_DIR by default)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    try:
        batches = parse_list(a.batch)
        rules = parse_list(a.rules, str)
        if not rules or not set(rules) <= {"eagle2", "cast"}:
            raise ValueError(f"--rules takes eagle2 / cast, got {a.rules!r}")
        buffers = parse_list(a.buffers, str) or [None]
        if not set(buffers) <= {None, "fixed", "growing"}:
            raise ValueError(f"--buffers takes fixed / growing, got {a.buffers!r}")
    except ValueError as e:
        p.error(str(e))
    if not 1 <= a.new_tokens < a.context:
        p.error("--new-tokens must be >= 1 and less than --context")

    provider = choose_provider(a.provider)
    dtype = choose_dtype(a.dtype, provider)
    budget = Budget(top_k=a.top_k, max_depth=a.depth, max_breadth=a.breadth)
    onnx_path, meta = export_draft(a.model, top_k=a.top_k, dtype=dtype, cache_dir=a.cache_dir)
    if meta.max_context and a.context + a.depth > meta.max_context:
        p.error(f"--context {a.context} + --depth {a.depth} exceeds the model's {meta.max_context} positions")
    rows = []
    print(f"{a.model} on {device_name(provider)} ({provider}, {dtype}), onnxruntime {ort.__version__}: "
          f"depth {a.depth}, top-k {a.top_k}, breadth {a.breadth}, context {a.context}, {a.repeats} calls")
    print(f"{'batch':>5} {'rules':>6} {'buffers':>8} {'median ms':>10} {'p10':>8} {'p90':>8} {'model ms':>9} "
          f"{'nodes':>6}")
    for mode in buffers:
        fixed = None if mode is None else mode == "fixed"
        runner = DraftRunner(onnx_path, meta, provider=provider, threads=a.threads, fixed_buffers=fixed)
        for batch in batches:
            for rule in rules:
                cell_budget = with_free_cast_rules(budget) if rule == "cast" else budget
                row = time_expand(runner, batch, a.context, a.new_tokens, cell_budget, a.repeats, a.warmup)
                rows.append(row)
                print(f"{batch:>5} {rule:>6} {row['buffers']:>8} {row['median_ms']:>10.3f} {row['p10_ms']:>8.3f} "
                      f"{row['p90_ms']:>8.3f} {row['model_median_ms']:>9.3f} {row['nodes_per_tree']:>6}")
                sys.stdout.flush()
    result = {
        "model": str(a.model),
        "device": device_name(provider),
        "provider": provider,
        "dtype": dtype,
        "onnxruntime": ort.__version__,
        "budget": {"top_k": a.top_k, "max_depth": a.depth, "max_breadth": a.breadth},
        "context": a.context,
        "new_tokens": a.new_tokens,
        "repeats": a.repeats,
        "warmup": a.warmup,
        "rows": rows,
    }
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
