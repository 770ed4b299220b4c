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
