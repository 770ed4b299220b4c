"""CAST's closed loop in process, without a GPU: the orchestrator's Planner priced from given cost tables (a GPU
run's, from the cost-table cache), the real draft Expander on the reference draft (ORT CPU), and the target's
greedy tokens precomputed (the reference target on CPU, transformers). Per step it logs the budget (max_depth,
returned nodes, step_base_cost), the draft's expanded nodes and depth, select's m, the committed tokens and the
calibration's scales: what a GPU sweep's steps would be, bar the timing noise (each step is priced as predicted).

    python -m benchmarks.cast_replay --tables DIR --batch 1,8 --steps 40 --out replay.json

Runs on any tree of this repository (main or a branch): what differs between two runs is the code.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
from pathlib import Path

import numpy as np

from cast_core.cost_table import CostTable
from cast_runtime.sessions import SessionStore
from draft_service.expansion import Expander, SequenceInput
from draft_service.export import export_draft
from draft_service.runner import DraftRunner
from draft_service.servicer import budget_from_proto
from orchestrator.costs import CostModel
from orchestrator.planner import Planner
from orchestrator.policies import POLICIES

MODELS = Path(__file__).resolve().parents[1] / "models" / "reference"


def load_costs(tables: Path) -> CostModel:
    verify = CostTable.from_json(next(tables.glob("verify-*.json")).read_text())
    draft = CostTable.from_json(next(tables.glob("draft-*.json")).read_text())
    return CostModel.from_tables(verify, draft)


def greedy_sequences(count: int, prompt_len: int, new: int, cache: Path) -> list[list[int]]:
    """`count` HumanEval prompts (their first prompt_len tokens) and the reference target's greedy continuation."""
    if cache.exists():
        data = json.loads(cache.read_text())
        if len(data) >= count and all(len(s) >= prompt_len + new for s in data[:count]):
            return [s[: prompt_len + new] for s in data[:count]]
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from cast_models.humaneval import load_prompts

    tokenizer = Tokenizer.from_file(str(MODELS / "target" / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(MODELS / "target", torch_dtype=torch.float32).eval()
    out = []
    for text in load_prompts()[:count]:
        ids = tokenizer.encode(text).ids[-prompt_len:]
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, min_new_tokens=new)
        out.append([int(x) for x in g[0]])
    cache.write_text(json.dumps(out))
    return out


def accepted(tree, target: list[int]) -> list[int]:
    """The committed tokens: the tree's path that matches the target's greedy tokens, then the bonus token."""
    node, path = 0, []
    for token in target:
        match = np.nonzero((tree.parents == node) & (tree.tokens == token))[0]
        if match.size == 0:
            break
        node = int(match[0])
        path.append(token)
    return path + [target[len(path)]]


def run(batch: int, steps: int, seqs: list[list[int]], prompt_len: int, costs: CostModel, runner,
        verify_rpc_ms: float = 0.0, draft_rpc_ms: float = 0.0, gate: bool = False) -> list[dict]:
    """gate: plain steps where the draft gate says so (else every step drafts); *_rpc_ms: each call's time beyond
    the table's forward, which the cost model learns as the services' overheads (what a GPU run adds)."""
    costs = copy.deepcopy(costs)
    planner = Planner(POLICIES["cast"])
    takes_tokens = "tokens" in inspect.signature(planner.learn_step).parameters
    expander = Expander(runner, SessionStore(batch, ttl_s=1e9), runner.meta.max_context)
    ids = [f"s{b}" for b in range(batch)]
    seqs = [seqs[b % len(seqs)] for b in range(batch)]
    length = [prompt_len] * batch  # committed tokens, the root (last) included
    drafted = [0] * batch  # tokens the draft has committed (it hears of a plain step's at its next Expand)
    rows = []
    for step in range(steps):
        context = max(length)
        drafts = planner.drafts(costs, batch, context)
        if gate and not drafts:  # a plain step: each sequence commits its target token
            committed = [[s[n]] for s, n in zip(seqs, length)]
            verify_ms = costs.verify.lookup(batch, context, 1) + verify_rpc_ms
            costs.observe_verify(batch, context, 1, verify_ms / 1e3)
            planner.learn_step(batch, False, [], [1] * batch, verify_ms, False)
            rows.append({"step": step, "gate_drafts": False, "tokens": 1.0})
            length = [n + len(c) for c, n in zip(committed, length)]
            continue
        gate_drafts = drafts
        proto = planner.budget(costs, batch, context)
        budget = budget_from_proto(proto)
        trees, _ = expander.expand([SequenceInput(i, np.asarray(s[d:n], dtype=np.int64), d)
                                    for i, s, d, n in zip(ids, seqs, drafted, length)], budget)
        drafted = list(length)
        forwards = [(0, 1)]
        for layer in trees[0].layers:
            if layer.kept:
                forwards.append((forwards[-1][0] + forwards[-1][1], layer.kept))
        model_ms = sum(costs.draft.lookup(batch, context + r, n) for r, n in forwards)
        costs.observe_draft(batch, context, forwards, (model_ms + draft_rpc_ms) / 1e3, model_ms / 1e3)
        draft_ms = model_ms + draft_rpc_ms
        chosen = planner.select([e.tree for e in trees], costs, batch, context, draft_ms)
        committed = [accepted(t, s[n:]) for t, s, n in zip(chosen, seqs, length)]
        planner.learn_layers([e.layer_utilities for e in trees])
        verify_ms = costs.verify.lookup(batch, context, max(len(t) for t in chosen)) + verify_rpc_ms
        costs.observe_verify(batch, context, max(len(t) for t in chosen), verify_ms / 1e3)
        step_ms = draft_ms + verify_ms
        args = (batch, True, chosen, [len(c) for c in committed], step_ms, False)
        planner.learn_step(*args, tokens=committed) if takes_tokens else planner.learn_step(*args)
        planner.prepare_budget(costs, batch, context + 1)
        rows.append({
            "step": step, "gate_drafts": bool(gate_drafts), "max_depth": proto.max_depth,
            "returned_cap": proto.max_returned_nodes, "step_base": round(proto.cast.step_base_cost, 3),
            "alpha": round(proto.cast.gain_mean, 3),
            "expanded": float(np.mean([e.expanded_nodes for e in trees])),
            "returned": float(np.mean([len(e.tree) for e in trees])),
            "layers": float(np.mean([len(e.layers) for e in trees])),
            "m": len(chosen[0]) if batch == 1 else float(np.mean([len(t) for t in chosen])),
            "depth": max(t.max_depth for t in chosen),
            "tokens": float(np.mean([len(c) for c in committed])),
            "scales": [round(x, 2) for x in proto.cast.depth_scales],
            "sibling": [round(x, 2) for x in getattr(proto.cast, "sibling_scales", [])],
        })
        length = [n + len(c) for c, n in zip(committed, length)]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cast_replay", description=__doc__.split("\n")[0])
    p.add_argument("--tables", required=True, type=Path, help="folder with one verify-*.json and one draft-*.json")
    p.add_argument("--batch", default="1")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--greedy", type=Path, default=Path("greedy.json"), help="cache of the target's greedy tokens")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--gate", action="store_true", help="plain steps where the draft gate says so")
    p.add_argument("--verify-rpc-ms", type=float, default=0.0)
    p.add_argument("--draft-rpc-ms", type=float, default=0.0)
    a = p.parse_args(argv)
    costs = load_costs(a.tables)
    seqs = greedy_sequences(a.prompts, a.prompt_len, 8 * a.steps + 16, a.greedy)
    onnx_path, meta = export_draft(MODELS / "draft", top_k=8, dtype="float32")
    runner = DraftRunner(onnx_path, meta, provider="cpu", threads=1)
    out = {}
    for batch in [int(x) for x in a.batch.split(",")]:
        cells = []
        for first in range(0, a.prompts, batch) if batch < a.prompts else [0]:
            rows = run(batch, a.steps, seqs[first:] + seqs[:first], a.prompt_len, costs, runner, a.verify_rpc_ms,
                       a.draft_rpc_ms, a.gate)
            cells.append(rows)
            for r in rows if not a.quiet else []:
                print(batch, first, json.dumps(r))
            d = [r for r in rows if "expanded" in r]
            print(f"batch {batch} prompt {first}: tokens/step {np.mean([r['tokens'] for r in rows]):.2f}  drafted "
                  f"steps {len(d)}: tokens {np.mean([r['tokens'] for r in d]) if d else 0:.2f} expanded "
                  f"{np.median([r['expanded'] for r in d]) if d else 0:.0f}  m {np.median([r['m'] for r in d]) if d else 0:.0f}"
                  f"  depth {np.median([r['depth'] for r in d]) if d else 0:.0f}  gate plain in "
                  f"{sum(not r['gate_drafts'] for r in rows)} of {len(rows)} steps")
            sys.stdout.flush()
        out[batch] = cells
    if a.out:
        a.out.write_text(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
