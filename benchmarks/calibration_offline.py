"""Offline: how well does a node's calibrated value predict that the target accepts it (issue 21)?

    python -m benchmarks.calibration_offline collect --out /tmp/nodes.npz [--humaneval 80] [--steps 12]
    python -m benchmarks.calibration_offline analyse /tmp/nodes.npz > report.md

collect: with the reference pair on the CPU (fp32), for each prompt (the held-out set and HumanEval) the target's
greedy continuation (HF generate), then decoding steps as the services run them: the draft (the real Expander, ONNX)
expands a CAST-like tree from the committed prefix (top-8 children, the best `--breadth` nodes of a layer expanded,
`--depth` layers, every node returned), each node is labelled accepted when its path is the target's greedy
continuation (a greedy verifier accepts exactly that path), and the step commits the accepted path plus the bonus
token. Saves per node: prompt set, prompt, step, depth, parent, draft value, accepted.

analyse: fits on one half of each set's prompts, evaluates on the other (and back), three predictors of acceptance:
(a) today's one scale per depth (ratio of sums, orchestrator/calibration.py), (b) a scale per (depth, bin of log
value), (c) a power law a_d * v^b_d (log-likelihood fit per depth); each capped by its parent's prediction, as
selection.calibrated_values does. Reports reliability, Brier and log loss, and for the top-m nodes by each
predictor the expected against the real accepted tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REF = Path(__file__).resolve().parents[1] / "models" / "reference"
HELDOUT = Path(__file__).resolve().parent / "prompts" / "heldout.jsonl"


def collect(a) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cast_models.humaneval import load_prompts
    from cast_runtime.sessions import SessionStore
    from draft_service.expansion import Budget, Expander, SequenceInput
    from draft_service.export import export_draft
    from draft_service.runner import DraftRunner

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(REF / "target")
    target = AutoModelForCausalLM.from_pretrained(REF / "target", dtype=torch.float32).eval()
    path, meta = export_draft(REF / "draft", top_k=8, dtype="float32")
    expander = Expander(DraftRunner(path, meta, provider="cpu"), SessionStore(4, 600.0), meta.max_context)
    budget = Budget(top_k=8, max_depth=a.depth, max_breadth=a.breadth)
    sets = [("heldout", [json.loads(line)["prompt"].rstrip("\n") for line in HELDOUT.read_text().splitlines()]),
            ("humaneval", [q.rstrip("\n") for q in load_prompts()[: a.humaneval]])]
    rows = []  # set, prompt, step, depth, parent(global row), value, accepted
    for s, (name, prompts) in enumerate(sets):
        for p, prompt in enumerate(prompts):
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = target.generate(ids, max_new_tokens=a.new_tokens + a.depth + 1, do_sample=False,
                                      pad_token_id=tok.eos_token_id or 0)
            full = out[0].tolist()
            n0 = ids.shape[1]
            committed, new, sid = n0, full[:n0], f"{name}-{p}"
            for step in range(a.steps):
                if committed - n0 >= a.new_tokens:
                    break
                (exp,), _ = expander.expand([SequenceInput(sid, np.asarray(new, dtype=np.int64),
                                                           committed - len(new))], budget)
                t = exp.tree
                truth = full[committed:]  # the greedy tokens after the root
                ok = np.zeros(len(t), dtype=bool)
                ok[0] = True
                for i in range(1, len(t)):  # parents precede children
                    d = int(t.depths[i])
                    ok[i] = ok[t.parents[i]] and d <= len(truth) and int(t.tokens[i]) == truth[d - 1]
                base = len(rows)
                for i in range(1, len(t)):
                    par = int(t.parents[i])
                    rows.append((s, p, step, int(t.depths[i]), base + par - 1 if par > 0 else -1,
                                 float(t.values[i]), bool(ok[i])))
                accepted = int(t.depths[ok].max())
                new = full[committed:committed + accepted + 1]
                committed += accepted + 1
            expander.release([sid])
            print(f"{name} {p}: {committed - n0} tokens", file=sys.stderr, flush=True)
    r = np.array(rows, dtype=np.float64)
    np.savez(a.out, set=r[:, 0].astype(int), prompt=r[:, 1].astype(int), step=r[:, 2].astype(int),
             depth=r[:, 3].astype(int), parent=r[:, 4].astype(int), value=r[:, 5], accepted=r[:, 6].astype(bool))
    return 0


# ---- analysis ---------------------------------------------------------------------------------------------------

EDGES = np.log([1e-3, 1e-2, 0.05, 0.2, 0.5])  # log-value bin edges: 6 bins


def cap_by_parent(pred: np.ndarray, parent: np.ndarray, depth: np.ndarray) -> np.ndarray:
    out = pred.copy()
    for d in range(2, int(depth.max()) + 1):
        i = np.nonzero(depth == d)[0]
        out[i] = np.minimum(out[i], out[parent[i]])
    return np.minimum(out, 1.0)


def top_ranks(p: np.ndarray, tree_id: np.ndarray) -> np.ndarray:
    """Each node's rank (0 = best) within its tree by p."""
    order = np.lexsort((-p, tree_id))
    starts = np.searchsorted(tree_id[order], tree_id[order], side="left")
    rank = np.empty(len(p), dtype=np.int64)
    rank[order] = np.arange(len(p)) - starts
    return rank


def fit_depth(v, y, depth, D):
    return np.array([(y[depth == d].sum() + 0.25) / (v[depth == d].sum() + 0.25) for d in range(1, D + 1)])


def pred_depth(s, v, depth):
    return s[depth - 1] * v


def fit_bins(v, y, depth, D):
    b = np.searchsorted(EDGES, np.log(v))
    table = np.ones((D, len(EDGES) + 1))
    for d in range(1, D + 1):
        prior = (y[depth == d].sum() + 0.25) / (v[depth == d].sum() + 0.25)
        for k in range(len(EDGES) + 1):
            m = (depth == d) & (b == k)
            table[d - 1, k] = (y[m].sum() + 0.25 * prior) / (v[m].sum() + 0.25)
    return table


def pred_bins(t, v, depth):
    return t[depth - 1, np.searchsorted(EDGES, np.log(v))] * v


def fit_power(v, y, depth, D):
    """Per depth, p = min(1, exp(c + b log v)), maximum likelihood over a grid of b (c by a Newton-free line search)."""
    out = np.zeros((D, 2))
    for d in range(1, D + 1):
        m = depth == d
        lv, yy = np.log(v[m]), y[m]
        best = (np.inf, 0.0, 1.0)
        for b in np.linspace(0.2, 1.6, 57):
            for c in np.linspace(-3, 3, 121):
                p = np.clip(np.exp(c + b * lv), 1e-6, 1 - 1e-6)
                ll = -(yy * np.log(p) + (1 - yy) * np.log1p(-p)).sum()
                if ll < best[0]:
                    best = (ll, c, b)
        out[d - 1] = best[1], best[2]
    return out


def pred_power(t, v, depth):
    return np.exp(t[depth - 1, 0] + t[depth - 1, 1] * np.log(v))


Q_EDGES = np.array([0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])  # bins of the draft's own probability


def conditional(v, parent, depth):
    """q: each node's own draft probability (its value over its parent's; the root's value is 1)."""
    pv = np.where(parent >= 0, v[np.maximum(parent, 0)], 1.0)
    return np.clip(v / pv, 0.0, 1.0)


def fit_chain(v, y, depth, D, parent_ok, q, per_depth=False):
    """Acceptance given the parent accepted, as a function of q: per q-bin rate (prior: q itself, 2 nodes' worth),
    made non-decreasing, interpolated linearly between the bins' mean q (and through (0, 0) and (1, 1))."""
    tables = []
    for d in (range(1, D + 1) if per_depth else [None]):
        m = parent_ok & ((depth == d) if d is not None else True)
        b = np.searchsorted(Q_EDGES, q[m])
        xs, ys = [0.0], [0.0]
        for k in range(len(Q_EDGES) + 1):
            c = b == k
            if c.sum():
                xs.append(float(q[m][c].mean()))
                ys.append(float((y[m][c].sum() + 2 * q[m][c].mean()) / (c.sum() + 2)))
        xs.append(1.0); ys.append(1.0)
        tables.append((np.array(xs), np.maximum.accumulate(np.array(ys))))
    return tables


def pred_chain(tables, v, depth, parent, q):
    p = np.zeros_like(v)
    for d in range(1, int(depth.max()) + 1):
        i = np.nonzero(depth == d)[0]
        xs, ys = tables[min(d, len(tables)) - 1]
        g = np.interp(q[i], xs, ys)
        p[i] = g * np.where(parent[i] >= 0, p[np.maximum(parent[i], 0)], 1.0)
    return p


METHODS = {"a: scale per depth": (fit_depth, pred_depth), "b: scale per (depth, log-value bin)": (fit_bins, pred_bins),
           "c: power law per depth": (fit_power, pred_power)}


def analyse(a) -> int:
    z = np.load(a.data)
    v, y, depth, parent = z["value"].astype(np.float64), z["accepted"].astype(float), z["depth"], z["parent"]
    v = np.maximum(v, 1e-12)
    D = int(depth.max())
    tree_id = z["set"] * 100000 + z["prompt"] * 1000 + z["step"]
    half = (z["prompt"] % 2).astype(int)
    print(f"{len(v)} nodes, {len(np.unique(tree_id))} trees, depth <= {D}; sets: "
          + ", ".join(f"{n} {int((z['set'] == s).sum())}" for s, n in enumerate(["held-out", "HumanEval"])))
    for s, setname in enumerate(["held-out", "HumanEval", "both"]):
        sel_set = np.ones_like(y, bool) if s == 2 else (z["set"] == s)
        print(f"\n## {setname} (fit on half the prompts, evaluated on the other, both ways)\n")
        preds = {}
        for name, (fit, pred) in METHODS.items():
            p = np.zeros_like(v)
            for h in (0, 1):
                train, test = sel_set & (half != h), sel_set & (half == h)
                fitted = train
                for _ in range(3 if a.fit_top else 1):  # the verified nodes depend on the ranking, as online
                    params = fit(v[fitted], y[fitted], depth[fitted], D)
                    if a.fit_top:
                        ranked = cap_by_parent(pred(params, v, depth), parent, depth)
                        fitted = train & (top_ranks(ranked, tree_id) < a.fit_top - 1)  # m counts the root
                p[test] = pred(params, v[test], depth[test])
            preds[name] = cap_by_parent(p, parent, depth)
        q = conditional(v, parent, depth)
        parent_ok = np.where(parent >= 0, y[np.maximum(parent, 0)] > 0, True)
        for label, per_depth in (("d: chain, acceptance given parent by q", False),
                                 ("e: chain, per depth", True)):
            p = np.zeros_like(v)
            for h in (0, 1):
                train, test = sel_set & (half != h), sel_set & (half == h)
                fitted = train
                for _ in range(3 if a.fit_top else 1):
                    tables = fit_chain(v[fitted], y[fitted], depth[fitted], D, parent_ok[fitted], q[fitted],
                                       per_depth)
                    if a.fit_top:
                        ranked = pred_chain(tables, v, depth, parent, q)
                        fitted = train & (top_ranks(ranked, tree_id) < a.fit_top - 1)
                p[test] = pred_chain(tables, v, depth, parent, q)[test]
            preds[label] = p
            if h == 1 and s == 2:
                print(f"\n{label}, table (q: acceptance given parent): "
                      + "; ".join(" ".join(f"{x:.2f}:{y_:.2f}" for x, y_ in zip(*t)) for t in tables[:3]))
        preds["draft value (no calibration)"] = v
        m = sel_set
        print("| predictor | Brier | log loss | sum predicted / sum accepted |")
        print("| --- | --- | --- | --- |")
        for name, p in preds.items():
            pc = np.clip(p[m], 1e-6, 1 - 1e-6)
            brier = np.mean((pc - y[m]) ** 2)
            ll = -np.mean(y[m] * np.log(pc) + (1 - y[m]) * np.log1p(-pc))
            print(f"| {name} | {brier:.5f} | {ll:.4f} | {p[m].sum() / y[m].sum():.3f} |")
        print("\nReliability (predicted vs observed acceptance) by depth and log-value bin, (a) and (b):\n")
        print("| depth | value bin | nodes | observed | (a) predicted | (b) predicted | (c) predicted | (d) | (e) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        names = list(preds)[:5]
        lab = ["<1e-3", "1e-3..1e-2", "1e-2..0.05", "0.05..0.2", "0.2..0.5", ">0.5"]
        bins = np.searchsorted(EDGES, np.log(v))
        for d in range(1, D + 1):
            for k in range(len(lab)):
                c = m & (depth == d) & (bins == k)
                if c.sum() < 30:
                    continue
                print(f"| {d} | {lab[k]} | {int(c.sum())} | {y[c].mean():.3f} | "
                      + " | ".join(f"{preds[n][c].mean():.3f}" for n in names) + " |")
        print("\nTop-m nodes of each tree by each predictor: expected tokens (sum of predictions) vs accepted, per tree;"
              " and the marginal nodes (ranks m/2+1..m):\n")
        print("| predictor | m | expected | accepted | ratio | marginal expected | marginal accepted | ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        ids = np.unique(tree_id[m])
        for name, p in preds.items():
            for mm in (8, 16, 32, 64):
                e = acc = me = ma = 0.0
                for t in ids:
                    i = np.nonzero(tree_id == t)[0]
                    order = i[np.argsort(-p[i], kind="stable")]
                    top, marg = order[: mm - 1], order[mm // 2 - 1: mm - 1]  # m counts the root
                    e += p[top].sum(); acc += y[top].sum(); me += p[marg].sum(); ma += y[marg].sum()
                n = len(ids)
                print(f"| {name} | {mm} | {e / n:.3f} | {acc / n:.3f} | {e / max(acc, 1e-9):.2f} | {me / n:.3f} | "
                      f"{ma / n:.3f} | {me / max(ma, 1e-9):.2f} |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--humaneval", type=int, default=80)
    c.add_argument("--new-tokens", type=int, default=64)
    c.add_argument("--steps", type=int, default=16)
    c.add_argument("--depth", type=int, default=7)
    c.add_argument("--breadth", type=int, default=6)
    an = sub.add_parser("analyse")
    an.add_argument("data", type=Path)
    an.add_argument("--fit-top", type=int, default=0,
                    help="fit on each tree's top m nodes by the predictor being fitted (the verified nodes, as the "
                         "orchestrator sees them), iterated; 0: on every node")
    a = p.parse_args(argv)
    return collect(a) if a.cmd == "collect" else analyse(a)


if __name__ == "__main__":
    raise SystemExit(main())
