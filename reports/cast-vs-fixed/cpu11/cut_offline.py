"""Offline: which cut (nodes verified per tree) does CAST's efficiency rule choose, with and without a correction
per rank of the tree (a factor per bucket of ranks 1, 2-3, 4-7, ...: accepted nodes per unit of calibrated value,
fit on the other half of the prompts), and what does it return? (issue 21; reports/cast-vs-fixed/, round 11)

    python -m benchmarks.calibration_offline collect --out /tmp/nodes.npz     # labelled nodes (5 min)
    python reports/cast-vs-fixed/cpu11/cut_offline.py /tmp/nodes.npz [--batch 32] [--base-ms 8.8] [--node-ms 0.66] [--draft-ms 3.4]

Trees: the labelled nodes of `calibration_offline collect` (the real draft's trees on the reference pair, each node
accepted when its path is the target's greedy continuation). Per tree, nodes ranked by the per-depth calibrated
value (scales fit on the other half of the prompts, on each tree's top 32, as the orchestrator learns from the
nodes it verifies). A step: `--batch` trees drawn at random, one m for all (the rule of Planner.select: argmax over m
of the batch's mean expected tokens / the step's cost, cost = base + node-ms * m per sequence + draft). Rules: (a) the
per-depth values; (b) with the factor per rank bucket fit on the other half; (m*) the best single m in hindsight.
Returned: tokens a step (1 + accepted nodes within the top m) per ms of the modelled step.
"""
import argparse

import numpy as np

from benchmarks.calibration_offline import top_ranks
from orchestrator.calibration import PRIOR_MASS

RANK_BUCKETS = 7  # ranks 1, 2-3, 4-7, 8-15, 16-31, 32-63, 64 and on
RANK_LIMITS = (0.25, 4.0)


def rank_buckets(n: int) -> np.ndarray:
    """[n] the bucket of ranks 1..n."""
    return np.minimum(np.log2(np.arange(1, n + 1)).astype(np.int64), RANK_BUCKETS - 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("nodes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--base-ms", type=float, default=8.8)
    p.add_argument("--node-ms", type=float, default=0.66)
    p.add_argument("--draft-ms", type=float, default=3.4)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--max-m", type=int, default=64)
    a = p.parse_args()
    z = np.load(a.nodes)
    value, depth, parent, accepted = z["value"], z["depth"], z["parent"], z["accepted"]
    tree_id = z["set"] * 100000 + z["prompt"] * 1000 + z["step"]
    half = (z["prompt"] % 2).astype(int)
    D = int(depth.max())
    trees = {h: [] for h in (0, 1)}  # per half: (keys sorted descending, accepted in that order)
    factors = {}
    for h in (0, 1):
        train = half != h
        # per-depth scales on the training half's top 32 of each tree by value
        rank = top_ranks(value, tree_id)
        fit = train & (rank < 31)
        scales = np.array([(accepted[fit & (depth == d)].sum() + PRIOR_MASS) /
                           (value[fit & (depth == d)].sum() + PRIOR_MASS) for d in range(1, D + 1)])
        key = capped(scales[depth - 1] * value, parent, depth)
        rank = top_ranks(key, tree_id)
        fit = train & (rank < 31)
        buckets = rank_buckets(int(rank.max()) + 1)[rank]
        hits = np.bincount(buckets[fit], weights=accepted[fit], minlength=RANK_BUCKETS)
        mass = np.bincount(buckets[fit], weights=key[fit], minlength=RANK_BUCKETS)
        factors[h] = np.clip((hits + PRIOR_MASS) / (mass + PRIOR_MASS), *RANK_LIMITS)
        test = np.flatnonzero(half == h)
        order = test[np.lexsort((-key[test], tree_id[test]))]
        for t, start in zip(*np.unique(tree_id[order], return_index=True)):
            members = order[start:][tree_id[order[start:]] == t]
            trees[h].append((key[members][: a.max_m - 1], accepted[members][: a.max_m - 1]))
    rng = np.random.default_rng(0)
    ms = a.base_ms + a.node_ms * np.arange(1, a.max_m + 1) + a.draft_ms  # [M] the step's cost at m = 1..M
    chosen = {"a": [], "b": []}
    returned = {"a": [], "b": []}
    by_m = np.zeros(a.max_m)  # tokens per ms of each fixed m, summed over steps
    for _ in range(a.steps):
        h = int(rng.integers(2))
        batch = [trees[h][i] for i in rng.integers(len(trees[h]), size=a.batch)]
        keys = np.zeros((a.batch, a.max_m - 1))
        hits = np.zeros((a.batch, a.max_m - 1))
        for b, (k, y) in enumerate(batch):
            keys[b, : k.shape[0]], hits[b, : y.shape[0]] = k, y
        tokens = 1 + np.concatenate([[0.0], np.cumsum(hits.mean(0))])  # [M] real tokens a step at m
        gains = keys.mean(0)
        corrected = gains * factors[h][rank_buckets(a.max_m - 1)]
        by_m += tokens / ms
        for rule, g in (("a", gains), ("b", corrected)):
            m = int(np.argmax((1 + np.concatenate([[0.0], np.cumsum(g)])) / ms)) + 1
            chosen[rule].append(m)
            returned[rule].append(tokens[m - 1] / ms[m - 1])
    best = int(np.argmax(by_m)) + 1
    oracle = by_m[best - 1] / a.steps
    print(f"batch {a.batch}, step = {a.base_ms} + {a.node_ms} x m + {a.draft_ms} ms; {a.steps} steps; "
          f"rank factors (fit per half): {np.round(factors[0], 2)} / {np.round(factors[1], 2)}")
    print(f"  m*: best single m {best}: {oracle:.4f} tokens/ms")
    for rule, name in (("a", "per-depth values (main)"), ("b", "with the rank correction")):
        got = np.mean(returned[rule])
        print(f"  ({rule}) {name}: m median {np.median(chosen[rule]):.0f} (p10-p90 {np.percentile(chosen[rule], 10):.0f}-"
              f"{np.percentile(chosen[rule], 90):.0f}), {got:.4f} tokens/ms = {got / oracle:.3f} of m*")


def capped(pred: np.ndarray, parent: np.ndarray, depth: np.ndarray) -> np.ndarray:
    out = pred.copy()
    for d in range(2, int(depth.max()) + 1):
        i = np.flatnonzero(depth == d)
        out[i] = np.minimum(out[i], out[parent[i]])
    return out


if __name__ == "__main__":
    main()
