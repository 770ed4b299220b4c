"""Offline (issue 21): the per-depth scale against a scale per (depth, top-1 child or a sibling), on the nodes that
`benchmarks.calibration_offline collect` saved: where the marginal nodes of the top-m come from, and whether splitting
each depth's scale by sibling rank removes their overvaluation. Fit on each tree's top 32 (as verified), one half of
the prompts, evaluated on the other.

    python -m benchmarks.calibration_siblings /tmp/nodes.npz
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks.calibration_offline import cap_by_parent, fit_depth, pred_depth, top_ranks

DEPTH = 7
PRIOR = 0.25  # units of value at which a group's own ratio counts as much as the prior (1)


def fit_on_top32(fit, predict, train, tree_id) -> np.ndarray:
    """Fit on the training half's nodes, then three times on the training trees' top 32 by the fit's own ranking."""
    fitted = train
    for _ in range(3):
        scales = fit(fitted)
        fitted = train & (top_ranks(predict(scales), tree_id) < 31)
    return scales


def sibling_ranks(value: np.ndarray, parent: np.ndarray, tree_id: np.ndarray) -> np.ndarray:
    """Each node's rank among its parent's children by value (0: the top-1 child); depth-1 nodes grouped by tree."""
    group = np.where(parent >= 0, parent, -1 - tree_id)
    order = np.lexsort((-value, group))
    first = np.searchsorted(group[order], group[order])
    ranks = np.empty(len(value), dtype=int)
    ranks[order] = np.arange(len(value)) - first
    return ranks


def report(name: str, predicted: np.ndarray, accepted: np.ndarray, tree_id: np.ndarray) -> None:
    trees = len(np.unique(tree_id))
    clipped = np.clip(predicted, 1e-6, 1 - 1e-6)
    brier = np.mean((clipped - accepted) ** 2)
    log_loss = -np.mean(accepted * np.log(clipped) + (1 - accepted) * np.log1p(-clipped))
    print(name, "Brier %.5f logloss %.4f" % (brier, log_loss))
    rank = top_ranks(predicted, tree_id)
    for m in (8, 16, 32, 64):
        top = rank < m - 1
        marginal = (rank >= m // 2 - 1) & top
        print(f"  m={m}: expected {predicted[top].sum() / trees:.3f} accepted {accepted[top].sum() / trees:.3f} | "
              f"marginal {predicted[marginal].sum() / trees:.3f} vs {accepted[marginal].sum() / trees:.3f} "
              f"ratio {predicted[marginal].sum() / accepted[marginal].sum():.2f}")


def main(path: str) -> None:
    z = np.load(path)
    value, accepted = np.maximum(z["value"], 1e-12), z["accepted"].astype(float)
    depth, parent = z["depth"], z["parent"]
    tree_id = z["set"] * 100000 + z["prompt"] * 1000 + z["step"]
    half = z["prompt"] % 2

    # (a) one scale per depth
    per_depth = np.zeros_like(value)
    for h in (0, 1):
        scales = fit_on_top32(lambda m: fit_depth(value[m], accepted[m], depth[m], DEPTH),
                              lambda s: cap_by_parent(pred_depth(s, value, depth), parent, depth), half != h, tree_id)
        print("scales", np.round(scales, 2))
        per_depth[half == h] = pred_depth(scales, value, depth)[half == h]
    per_depth = cap_by_parent(per_depth, parent, depth)

    siblings = sibling_ranks(value, parent, tree_id)
    rank, trees = top_ranks(per_depth, tree_id), len(np.unique(tree_id))
    for lo, hi in ((0, 7), (7, 15), (15, 31), (31, 63)):
        in_ranks = (rank >= lo) & (rank < hi)
        for name, kind in (("top-1 child", siblings == 0), ("2nd+ child", siblings > 0)):
            nodes = in_ranks & kind
            print(f"ranks {lo + 2}-{hi + 1} {name}: n/tree {nodes.sum() / trees:.2f} "
                  f"predicted {per_depth[nodes].sum() / trees:.3f} accepted {accepted[nodes].sum() / trees:.3f} "
                  f"ratio {per_depth[nodes].sum() / max(accepted[nodes].sum(), 1):.2f}")

    # (f) a scale per (depth, top-1 child or not)
    print("--- f: scale per (depth, top-1 child or not)")
    group = (depth - 1) * 2 + (siblings > 0)

    def fit_groups(m: np.ndarray) -> np.ndarray:
        return np.array([(accepted[m & (group == g)].sum() + PRIOR) / (value[m & (group == g)].sum() + PRIOR)
                         for g in range(2 * DEPTH)])

    split = np.zeros_like(value)
    for h in (0, 1):
        scales = fit_on_top32(fit_groups, lambda s: cap_by_parent(s[group] * value, parent, depth), half != h, tree_id)
        print("scales top1/other", np.round(scales.reshape(DEPTH, 2).T, 2))
        split[half == h] = (scales[group] * value)[half == h]
    split = cap_by_parent(split, parent, depth)

    report("a", per_depth, accepted, tree_id)
    report("f", split, accepted, tree_id)


if __name__ == "__main__":
    main(sys.argv[1])
