"""Value calibration: how many tokens the verifier accepts per unit of node value, measured.

A node's value (EAGLE-2's score, the product of the draft's probabilities along its path) is CAST's estimate of how
likely the verifier is to accept it. Under greedy verification a node is accepted when it is the target's argmax,
which happens more often than the draft's probability says: on the reference pair about 1.5 accepted tokens per
unit of value at every batch size. Left uncorrected, every CAST rule undervalues depth and breadth by that factor
(at batch 8 on a CPU, trees of depth 2-3 where a fixed chain of 4 commits more per millisecond). The scale is
measured on the verified nodes themselves, so it also stays right under sampling (where it is near 1).
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT = 0.05  # moving-average weight of one step's ratio
LIMITS = (0.25, 4.0)  # a few odd steps (a tiny summed value) must not swing the rules by more than this


@dataclass
class ValueCalibration:
    scale: float = 1.0  # accepted draft tokens per unit of the verified nodes' summed value
    steps: int = 0

    def observe(self, verified_value: float, accepted: int) -> None:
        """One step: the verified nodes' summed value (root excluded) and the draft tokens accepted, batch-wide.
        The first steps count alike (their mean): the draft gate judges drafting on CAST's first few trees, which
        must not be sized by the starting guess of 1 for long."""
        if verified_value <= 0:
            return
        self.steps += 1
        ratio = min(max(accepted / verified_value, LIMITS[0]), LIMITS[1])
        self.scale += max(WEIGHT, 1 / self.steps) * (ratio - self.scale)
