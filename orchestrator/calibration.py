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

Top-1 children and siblings: the draft's top-1 child (its parent's child of highest value) is accepted more often
per unit of value than its value says, its other children far less (about 2x less than one scale per depth predicted
on the reference pair, so the marginal nodes of a larger cut were overvalued 1.15-1.39x and CAST verified trees
several times larger than the best fixed tree: reports/cast-vs-fixed/calibration_offline.md). So each depth has two
scales, measured apart: tokens accepted at depth d through a top-1 child per unit of the verified top-1 children's
value there, and the same for siblings. Which node was accepted at each depth comes from walking the committed
tokens down the verified tree.

Smoothing: per depth, decayed sums of accepted tokens and verified value (a window of about 1 / WEIGHT steps). The
pooled scale of a depth (both kinds together) has a prior worth PRIOR_MASS units of value: depth 1's prior is 1
(trust the draft), a deeper depth's is the depth above's pooled scale (a depth not verified yet, or rarely, is taken
to be like the one above it). Each kind's scale has a prior worth KIND_MASS units of value: its depth's pooled scale,
times the kind's ratio to the pooled scale at the depth above (1 at depth 1): it leaves the pooled scale only as its
own kind's evidence accrues, and a depth where the kind is rarely verified (deep siblings) keeps its standing above. With each kind's prior taken from the
depth above of the same kind (the first version, issue 21), one step halved the evidence a scale stood on and could
crash it: a step whose accepted path went through a sibling at depth d put the top-1 scale at d near
PRIOR_MASS / (value + PRIOR_MASS) and, through the prior chain, every top-1 scale below it (0.38 at depths 4-8 after
one step on the reference pair; a sibling scale is capped by the top-1 one, so both), and the next trees shrank to
one layer (benchmarks/cast_replay.py). The pooled scale is what one scale per depth measured before; a kind's own
evidence outweighs the prior within a few steps (a depth's top-1 children verify 0.3-0.9 units of value a step).
A sibling's scale is also capped by the top-1 scale at its depth (selection.sibling_scale: a sibling never outranks
its top-1 brother).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cast_core.selection import top_children
from cast_core.tree import TokenTree

WEIGHT = 0.05  # per step, the decay of the accepted and value sums (about the last 20 steps count)
PRIOR_MASS = 0.25  # units of verified value at which a depth's own ratio counts as much as its prior
KIND_MASS = 1.0  # units of verified value at which a kind's (top-1 or sibling) own ratio counts as much as the pooled
LIMITS = (0.25, 16.0)  # bounds of a depth's scale; a deep node's calibrated value is also capped by its parent's


@dataclass
class ValueCalibration:
    accepted: list[float] = field(default_factory=list)  # per depth d (entry d-1): decayed accepted top-1 children
    value: list[float] = field(default_factory=list)     # per depth d: decayed summed value of verified top-1 children
    sibling_accepted: list[float] = field(default_factory=list)  # the same for the other children
    sibling_value: list[float] = field(default_factory=list)

    def observe(self, verified: list[TokenTree], committed: list[Sequence[int]]) -> None:
        """One step: each sequence's verified tree (values as the draft sent them) and the tokens it committed
        (its accepted path's tokens + the bonus token), for the sequences of one batch."""
        depth = max((t.max_depth for t in verified), default=0)
        if depth == 0:
            return
        value, accepted = np.zeros((2, depth)), np.zeros((2, depth))  # row 0: top-1 children, row 1: siblings
        for tree, tokens in zip(verified, committed):
            if len(tree) == 1:
                continue
            sibling = ~top_children(tree)
            d = tree.depths[1:] - 1
            value += np.stack([np.bincount(d[s], weights=tree.values[1:][s], minlength=depth)[:depth]
                               for s in (~sibling[1:], sibling[1:])])
            for node in accepted_path(tree, tokens):
                accepted[int(sibling[node]), tree.depths[node] - 1] += 1
        kinds = ((self.accepted, accepted[0]), (self.value, value[0]),
                 (self.sibling_accepted, accepted[1]), (self.sibling_value, value[1]))
        size = max(depth, *(len(sums) for sums, _ in kinds))
        for sums, step in kinds:
            sums += [0.0] * (size - len(sums))
            for d in range(size):
                sums[d] = (1 - WEIGHT) * sums[d] + (float(step[d]) if d < depth else 0.0)

    def scales(self, depths: int) -> list[float]:
        """Accepted tokens per unit of value of top-1 children at depths 1..`depths`, smoothed and bounded
        (float32-exact: the draft receives them as float32 and must rank nodes as the orchestrator does)."""
        return _kind(self.accepted, self.value, self.pooled_scales(depths))

    def sibling_scales(self, depths: int) -> list[float]:
        """The same for the other children, each capped by the top-1 children's scale at its depth."""
        pooled = self.pooled_scales(depths)
        return [min(s, t) for s, t in zip(_kind(self.sibling_accepted, self.sibling_value, pooled),
                                          _kind(self.accepted, self.value, pooled))]

    def pooled_scales(self, depths: int) -> list[float]:
        """Accepted tokens per unit of value of all nodes at depths 1..`depths` (both kinds): the kinds' prior."""
        size = max(len(self.accepted), len(self.sibling_accepted))
        accepted = [_at(self.accepted, d) + _at(self.sibling_accepted, d) for d in range(size)]
        value = [_at(self.value, d) + _at(self.sibling_value, d) for d in range(size)]
        return _smoothed(accepted, value, depths)

    @property
    def scale(self) -> float:
        """One scale for all depths and nodes (accepted tokens per unit of value, pooled): where a rule has no depth
        to go by."""
        accepted = sum(self.accepted) + sum(self.sibling_accepted)
        scale = (accepted + PRIOR_MASS) / (sum(self.value) + sum(self.sibling_value) + PRIOR_MASS)
        return min(max(scale, LIMITS[0]), LIMITS[1])


def _at(sums: list[float], d: int) -> float:
    return sums[d] if d < len(sums) else 0.0


def _kind(accepted: list[float], value: list[float], pooled: list[float]) -> list[float]:
    """Per depth, one kind's decayed ratio with a prior worth KIND_MASS: the depth's pooled scale times the kind's
    ratio to the pooled scale at the depth above (1 at depth 1), bounded. A depth where the kind has no evidence
    keeps the kind's standing from above (a depth never verified: the scale above, as the pooled scales do)."""
    out, ratio = [], 1.0
    for d, prior in enumerate(pooled):
        scale = (_at(accepted, d) + KIND_MASS * ratio * prior) / (_at(value, d) + KIND_MASS)
        scale = min(max(scale, LIMITS[0]), LIMITS[1])
        ratio = scale / prior
        out.append(float(np.float32(scale)))
    return out


def _smoothed(accepted: list[float], value: list[float], depths: int) -> list[float]:
    """Per depth, the decayed ratio with the prior (1 at depth 1, the depth above's scale deeper), bounded."""
    out, prior = [], 1.0
    for d in range(depths):
        a = accepted[d] if d < len(accepted) else 0.0
        v = value[d] if d < len(value) else 0.0
        scale = (a + PRIOR_MASS * prior) / (v + PRIOR_MASS)
        prior = min(max(scale, LIMITS[0]), LIMITS[1])
        out.append(float(np.float32(prior)))
    return out


def accepted_path(tree: TokenTree, committed: Sequence[int]) -> list[int]:
    """The nodes of the tree's accepted path, depth 1 first: the committed tokens but the last (the bonus token)
    walked down from the root (siblings carry distinct tokens; the walk stops where no child matches)."""
    path, node = [], 0
    for token in committed[:-1]:
        match = np.nonzero((tree.parents == node) & (tree.tokens == token))[0]
        if match.size == 0:
            break
        node = int(match[0])
        path.append(node)
    return path
