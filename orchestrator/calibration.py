"""Value calibration: how many tokens the verifier accepts per unit of node value, measured per tree depth.

A node's value (EAGLE-2's score, the product of the draft's probabilities along its path) is CAST's estimate of how
likely the verifier is to accept it. Under greedy verification a node is accepted when it is the target's argmax,
which happens more often than the draft's probability says, and by more the deeper the node: a product of d
probabilities compounds the draft's under-confidence d times. On the reference pair one scale for all depths
(about 1.5 accepted tokens per unit of value) undervalued deep nodes, so CAST's depth rule stopped trees early and
its breadth rule spent the budget on siblings, where a deep narrow tree returned more tokens a step
(reports/cast-vs-fixed/). So the scale is measured per depth d: tokens accepted at depth d (a sequence whose
accepted path reaches d) per unit of the verified nodes' summed value at depth d. It is measured on the verified
nodes themselves, so it also stays right under sampling (where it is near 1).

Smoothing: per depth, decayed sums of accepted tokens and verified value (a window of about 1 / WEIGHT steps), and a
prior worth PRIOR_MASS units of value: depth 1's prior is 1 (trust the draft), a deeper depth's is the depth above's
scale (a depth not verified yet, or rarely, is taken to be like the one above it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cast_core.tree import TokenTree

WEIGHT = 0.05  # per step, the decay of the accepted and value sums (about the last 20 steps count)
PRIOR_MASS = 0.25  # units of verified value at which a depth's own ratio counts as much as its prior
LIMITS = (0.25, 16.0)  # bounds of a depth's scale; a deep node's calibrated value is also capped by its parent's


@dataclass
class ValueCalibration:
    accepted: list[float] = field(default_factory=list)  # per depth d (entry d-1): decayed accepted tokens
    value: list[float] = field(default_factory=list)     # per depth d: decayed summed value of verified nodes

    def observe(self, verified: list[TokenTree], committed: list[int]) -> None:
        """One step: each sequence's verified tree (values as the draft sent them) and the tokens it committed
        (accepted + the bonus token), for the sequences of one batch."""
        depth = max((t.max_depth for t in verified), default=0)
        if depth == 0:
            return
        value = np.zeros(depth)
        accepted = np.zeros(depth)
        for tree, n in zip(verified, committed):
            if len(tree) > 1:
                value += np.bincount(tree.depths[1:] - 1, weights=tree.values[1:], minlength=depth)[:depth]
                accepted[: min(n - 1, depth)] += 1  # its accepted path reaches depths 1..n-1
        grow = depth - len(self.value)
        if grow > 0:
            self.value += [0.0] * grow
            self.accepted += [0.0] * grow
        for d in range(len(self.value)):
            keep = 1 - WEIGHT
            self.value[d] = keep * self.value[d] + (value[d] if d < depth else 0.0)
            self.accepted[d] = keep * self.accepted[d] + (accepted[d] if d < depth else 0.0)

    def scales(self, depths: int) -> list[float]:
        """Accepted tokens per unit of value at depths 1..`depths`, smoothed and bounded (float32-exact: the draft
        receives them as float32 and must rank nodes as the orchestrator does)."""
        out, prior = [], 1.0
        for d in range(depths):
            accepted = self.accepted[d] if d < len(self.accepted) else 0.0
            value = self.value[d] if d < len(self.value) else 0.0
            scale = (accepted + PRIOR_MASS * prior) / (value + PRIOR_MASS)
            prior = min(max(scale, LIMITS[0]), LIMITS[1])
            out.append(float(np.float32(prior)))
        return out

    @property
    def scale(self) -> float:
        """One scale for all depths (accepted tokens per unit of value, pooled): where a rule has no depth to go by."""
        scale = (sum(self.accepted) + PRIOR_MASS) / (sum(self.value) + PRIOR_MASS)
        return min(max(scale, LIMITS[0]), LIMITS[1])


RANK_BUCKETS = 7  # ranks 1, 2-3, 4-7, 8-15, 16-31, 32-63, 64 and on: a bucket per power of two
RANK_LIMITS = (0.25, 4.0)  # bounds of a bucket's factor


def rank_buckets(n: int) -> np.ndarray:
    """[n] the bucket of ranks 1..n."""
    return np.minimum(np.log2(np.arange(1, n + 1)).astype(np.int64), RANK_BUCKETS - 1)


@dataclass
class RankCalibration:
    """Accepted tokens per unit of calibrated value by a node's rank in its tree (1: the best node after the root),
    the one correction the verifier's cut (Planner.select) applies on top of the per-depth scales.

    The depth scales are right for a depth's nodes together but not for its marginal ones: the nodes a larger cut
    adds are later siblings, accepted about half as often as their calibrated value says, while the first few are
    underrated (offline, reports/cast-vs-fixed/calibration_offline.md: ranks 1-8 0.77x, 9-64 1.15-1.39x their real
    acceptance). So CAST cut too many nodes wherever the verifier's cost grows with them (a GPU at batch 32: 23.8
    nodes verified against the best fixed tree's 14.7, for 0.11 more tokens a step). The ranks do not change, only
    how many are worth verifying. Measured like the depth scales, on the verified nodes; a bucket learns only from
    steps that verified its ranks, and keeps what it learned while the cut stays below them."""

    accepted: np.ndarray = field(default_factory=lambda: np.zeros(RANK_BUCKETS))  # decayed accepted nodes
    value: np.ndarray = field(default_factory=lambda: np.zeros(RANK_BUCKETS))     # decayed summed calibrated value

    def observe(self, verified: list[TokenTree], keys: list[np.ndarray], committed: list[list[int]]) -> None:
        """One step's verified trees, their nodes' calibrated values ([N] each, the root first) and the tokens each
        sequence committed (its accepted path, then the bonus token). For the whole batch at once: a few numpy
        calls, not a loop per tree and token (it runs after every drafted step, on its critical path)."""
        drafted = [i for i, t in enumerate(verified) if len(t) > 1]
        if not drafted:
            return
        trees = [verified[i] for i in drafted]
        sizes = np.array([len(t) for t in trees])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # [B] each tree's root
        owner = np.repeat(np.arange(len(trees)), sizes)  # [N] its tree
        depths = np.concatenate([t.depths for t in trees])
        parents = np.concatenate([t.parents for t in trees]) + starts[owner]
        parents[starts] = starts  # a root is its own ancestor
        value = np.concatenate([keys[i] for i in drafted]).astype(np.float64)
        # A node is accepted when its token is the path's at its depth, and so is every ancestor's.
        path = np.full((len(trees), int(depths.max()) + 1), -1, dtype=np.int64)  # [B, D + 1] accepted tokens
        for b, i in enumerate(drafted):
            accepted_path = committed[i][:-1][: path.shape[1] - 1]
            path[b, 1 : len(accepted_path) + 1] = accepted_path
        accepted = np.concatenate([t.tokens for t in trees]) == path[owner, depths]
        accepted[starts] = True
        for _ in range(int(depths.max()).bit_length()):
            accepted &= accepted[parents]
            parents = parents[parents]
        # Ranks within each tree, as TokenTree.top_m orders them (ties in tree order).
        others = np.flatnonzero(depths > 0)
        order = others[np.lexsort((others, -value[others], owner[others]))]
        first = np.searchsorted(owner[order], np.arange(len(trees)))  # [B] each tree's rank 1 in `order`
        ranks = np.arange(order.shape[0]) - first[owner[order]] + 1
        buckets = rank_buckets(int(ranks.max()))[ranks - 1]
        value = np.bincount(buckets, weights=value[order], minlength=RANK_BUCKETS)
        hits = np.bincount(buckets, weights=accepted[order].astype(np.float64), minlength=RANK_BUCKETS)
        seen = value > 0
        self.value[seen] = (1 - WEIGHT) * self.value[seen] + value[seen]
        self.accepted[seen] = (1 - WEIGHT) * self.accepted[seen] + hits[seen]

    def factors(self) -> np.ndarray:
        """[RANK_BUCKETS] accepted tokens per unit of calibrated value, smoothed toward 1 and bounded."""
        return np.clip((self.accepted + PRIOR_MASS) / (self.value + PRIOR_MASS), *RANK_LIMITS)

    def correct(self, utilities: np.ndarray) -> np.ndarray:
        """[n] batch_topk_utilities of calibrated values (u_1 the root's 1; u_k - u_(k-1) the batch's mean value at
        rank k - 1), with each rank's value times its bucket's factor."""
        gains = np.diff(utilities)  # [n - 1] ranks 1..n-1
        buckets = rank_buckets(gains.shape[0])
        return np.concatenate([utilities[:1], utilities[0] + np.cumsum(gains * self.factors()[buckets])])

