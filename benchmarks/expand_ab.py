"""The draft's Expand outside the model, this tree's against another's, in one process: calls alternate between the
two, each replaying its own recorded run of the reference draft (benchmarks.cast_overhead's replay: no ORT time), timed
in thread CPU time. On a shared machine, the noise that separate runs see between them mostly cancels here.

    git archive <commit> | tar -x -C /tmp/base
    python -m benchmarks.expand_ab --base-tree /tmp/base --model models/reference/draft --batch 1,8,32

The other tree's draft_service/kv.py and expansion.py are loaded under other names beside this tree's modules (the
rest, the runner and cast_core, is this tree's: keep that in mind for a base that changed them). Both Expands get the
budget of cast_overhead's cells; the digests of their trees must agree.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np

from benchmarks import cast_overhead as co
from cast.v1 import draft_pb2
from cast_runtime.sessions import SessionStore
from draft_service import expansion


def load_module(name: str, path: Path, replace: tuple[tuple[str, str], ...] = ()) -> types.ModuleType:
    source = path.read_text()
    for old, new in replace:
        source = source.replace(old, new)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def base_expansion(tree: Path) -> types.ModuleType:
    load_module("base_kv", tree / "draft_service" / "kv.py")
    return load_module("base_expansion", tree / "draft_service" / "expansion.py",
                       (("from draft_service.kv import BufferKV", "from base_kv import BufferKV"),))


def setup(module, onnx_path, meta, model: Path, batch: int, context: int, verified: int):
    """An Expander of `module` over its own runner, the sequences committed, one real Expand recorded."""
    runner = co.ReplayRunner(co.DraftRunner(onnx_path, meta, provider="cpu", threads=1))
    expander = module.Expander(runner, SessionStore(batch, ttl_s=1e9), meta.max_context)
    texts, ids, start = co.prompt_ids(model, batch, context), [f"s{b}" for b in range(batch)], context - 1
    runner.record()
    expander.expand([module.SequenceInput(s, t[:start], 0) for s, t in zip(ids, texts)],
                    module.Budget(top_k=8, max_depth=0, max_breadth=8))
    step = [module.SequenceInput(s, t[start:start + 1], start) for s, t in zip(ids, texts)]
    b = co.budget_from_proto(co.warm_planner(batch, verified).price_budget(co.gpu_shaped_costs(), batch, context))
    c = b.cast
    budget = module.Budget(b.top_k, b.max_depth, b.max_breadth, module.CastBudget(
        c.prices, c.breadth_threshold, c.depth_threshold, c.gain_mean, c.step_base_cost, c.depth_scales),
        b.max_returned_nodes)
    runner.record()
    out, _ = expander.expand(step, budget)
    for s in ids:
        expander.rewind(s, start)
    return expander, runner, step, budget, ids, start, co.digest([e.tree for e in out])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.expand_ab", description=__doc__.split("\n")[0])
    p.add_argument("--base-tree", required=True, type=Path, help="another checkout of the project (its draft_service)")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--context", type=int, default=160)
    p.add_argument("--verified", type=int, default=32)
    p.add_argument("--repeats", type=int, default=200, help="calls of each, alternating")
    a = p.parse_args(argv)
    base = base_expansion(a.base_tree)
    onnx_path, meta = co.export_draft(a.model, top_k=8, dtype="float32")
    print(f"{'batch':>5} {'base ms':>8} {'this ms':>8} {'this/base':>9}  digests")
    for batch in [int(x) for x in a.batch.split(",")]:
        cells = {name: setup(module, onnx_path, meta, a.model, batch, a.context, a.verified)
                 for name, module in (("base", base), ("this", expansion))}
        times: dict[str, list[float]] = {"base": [], "this": []}
        for i in range(a.repeats):
            for name in ("base", "this") if i % 2 else ("this", "base"):
                expander, runner, step, budget, ids, start, _ = cells[name]
                runner.replay()
                t0 = time.thread_time()
                expander.expand(step, budget)
                times[name].append((time.thread_time() - t0) * 1e3)
                runner.check()
                for s in ids:
                    expander.rewind(s, start)
        b, t = float(np.median(times["base"])), float(np.median(times["this"]))
        print(f"{batch:>5} {b:>8.3f} {t:>8.3f} {t / b:>9.2f}  {cells['base'][-1]} {cells['this'][-1]}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
