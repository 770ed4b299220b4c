"""Offline (issue 21): the built ValueCalibration (a scale per depth for top-1 children and one for siblings) fit
online, as the orchestrator fits it, on the nodes that `benchmarks.calibration_offline collect` saved: trees in
order, in batches; each batch is ranked by the calibration learned so far, its top-`verify` nodes per tree are
verified (the accepted path within them + a bonus token committed) and the calibration observes them. Reported: the
top-m nodes' expected tokens (sum of calibrated values) against accepted, and the marginal nodes' (ranks m/2+1..m),
for the split calibration and for one scale per depth (the same sums pooled: the calibration before issue 21).

    python -m benchmarks.calibration_built /tmp/nodes.npz [--batch 32] [--verify 32]
"""
from __future__ import annotations

import argparse

import numpy as np

from cast_core.selection import calibrated_values, top_children
from cast_core.tree import TokenTree
from orchestrator.calibration import ValueCalibration, _smoothed

DEPTHS = 7


class PooledCalibration(ValueCalibration):
    """One scale per depth for every node: the sums of both kinds together (orchestrator/calibration.py before)."""

    def scales(self, depths: int) -> list[float]:
        n = max(len(self.accepted), len(self.sibling_accepted))
        pad = lambda a: np.pad(np.asarray(a, dtype=float), (0, n - len(a)))  # noqa: E731
        return _smoothed((pad(self.accepted) + pad(self.sibling_accepted)).tolist(),
                         (pad(self.value) + pad(self.sibling_value)).tolist(), depths)

    def sibling_scales(self, depths: int) -> list[float]:
        return []


def load_trees(path: str) -> list[tuple[TokenTree, np.ndarray]]:
    """Each tree (root added, node i+1 = the i-th saved node; tokens = node indices) and its nodes' accepted flags."""
    z = np.load(path)
    key = z["set"] * 10**6 + z["prompt"] * 10**3 + z["step"]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], key.size]
    trees = []
    for s, e in zip(starts, ends):
        parent = z["parent"][s:e]
        parents = np.r_[-1, np.where(parent >= 0, parent - s + 1, 0)]
        tree = TokenTree.from_lists(np.arange(e - s + 1), parents, np.r_[0, z["depth"][s:e]],
                                    np.r_[1.0, z["value"][s:e]])
        trees.append((tree, np.r_[True, z["accepted"][s:e]]))
    return trees


def replay(trees, calibration: ValueCalibration, batch: int, verify: int, ms=(8, 16, 32, 64)):
    sums = {m: np.zeros(4) for m in ms}  # expected, accepted, marginal expected, marginal accepted
    kinds = np.zeros((2, 2))  # ranks 9-64 (m = 64's top less the first 8): [top-1, sibling] x [expected, accepted]
    for b in range(0, len(trees), batch):
        chunk = trees[b : b + batch]
        scales, siblings = calibration.scales(DEPTHS), calibration.sibling_scales(DEPTHS)
        verified, committed = [], []
        for tree, accepted in chunk:
            keys = calibrated_values(tree, scales, siblings)
            order = np.argsort(-keys[1:], kind="stable") + 1
            for m in ms:
                top, marginal = order[: m - 1], order[m // 2 - 1 : m - 1]
                sums[m] += [keys[top].sum(), accepted[top].sum(), keys[marginal].sum(), accepted[marginal].sum()]
            sibling = ~top_children(tree)
            mid = order[7:63]
            for k, nodes in enumerate((mid[~sibling[mid]], mid[sibling[mid]])):
                kinds[k] += [keys[nodes].sum(), accepted[nodes].sum()]
            kept = tree.top_m_indices(verify, keys)
            sub, hit = tree.subtree(kept), accepted[kept]
            # Tokens: the accepted path's nodes (closed under ancestors, so in index order by depth) 0, 1, 2, ...;
            # the others distinct; committed: the path below the root + a bonus token.
            tokens = np.where(hit, np.cumsum(hit) - 1, 10**9 + np.arange(kept.size))
            verified.append(TokenTree(tokens, sub.parents, sub.depths, sub.values))
            committed.append([*range(1, int(hit.sum())), -1])
        calibration.observe(verified, committed)
    n = len(trees)
    rows = [f"| {m} | {s[0] / n:.3f} | {s[1] / n:.3f} | {s[0] / s[1]:.2f} | {s[2] / n:.3f} | {s[3] / n:.3f} | "
            f"{s[2] / s[3]:.2f} |" for m, s in sums.items()]
    rows.append(f"ranks 9-64 top-1 children predicted / accepted {kinds[0, 0] / kinds[0, 1]:.2f}, siblings "
                f"{kinds[1, 0] / kinds[1, 1]:.2f}; final scales top-1 {np.round(calibration.scales(DEPTHS), 2)} "
                f"siblings {np.round(calibration.sibling_scales(DEPTHS), 2)}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("nodes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--verify", type=int, default=32)
    a = p.parse_args()
    trees = load_trees(a.nodes)
    print(f"{len(trees)} trees, batches of {a.batch}, top {a.verify} verified")
    for name, calibration in (("split (built)", ValueCalibration()), ("one scale per depth", PooledCalibration())):
        print(f"\n{name}\n\n| m | expected | accepted | ratio | marginal expected | marginal accepted | ratio |\n"
              "| --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(replay(trees, calibration, a.batch, a.verify)))


if __name__ == "__main__":
    main()
