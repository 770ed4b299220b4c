"""CAST's breadth (C1) and depth (C2) pruning inside Expand, driven by the cost slice in the budget."""

from __future__ import annotations

import numpy as np

from cast_core.cost_table import NormalizedCostSlice
from draft_service.expansion import Budget, CastBudget, SequenceInput

PROMPT = [5, 17, 99, 3, 200, 42, 7, 310, 64]
LIMITS = dict(top_k=4, max_depth=5, max_breadth=4)


def expand(make_expander, cast: CastBudget | None):
    expander = make_expander()
    (expansion,), _ = expander.expand([SequenceInput("s", np.asarray(PROMPT), 0)], Budget(**LIMITS, cast=cast))
    return expansion


def linear_prices(lam: float, delta: float) -> NormalizedCostSlice:
    counts = (1, 2, 4, 8, 16, 32)
    row = [lam * n + delta for n in counts]
    return NormalizedCostSlice((1, 8, 64), counts, np.array([row, row, row]))


def test_free_drafting_grows_the_full_eagle2_tree(make_expander):
    eagle2 = expand(make_expander, None)
    cast = expand(make_expander, CastBudget(linear_prices(1e-6, 1e-6), 4.0, 3.0, 1.0))
    assert cast.tree.tokens.tolist() == eagle2.tree.tokens.tolist()
    assert [s.kept for s in cast.layers] == [s.kept for s in eagle2.layers]


def test_expensive_drafting_stops_after_the_first_layer(make_expander):
    pruned = expand(make_expander, CastBudget(linear_prices(1.0, 50.0), 4.0, 3.0, 1.0))
    # Layer 1 comes with the committing forward; expanding it would cost 50 verifier forwards: not worth it.
    assert len(pruned.layers) == 1 and pruned.layers[0].kept == 0
    assert len(pruned.tree) == 1 + LIMITS["top_k"]


def test_a_low_gain_mean_stops_depth_sooner(make_expander):
    prices = linear_prices(0.01, 0.05)
    optimistic = expand(make_expander, CastBudget(prices, 0.0, 3.0, 1.0))
    pessimistic = expand(make_expander, CastBudget(prices, 0.0, 3.0, 0.01))
    assert len(pessimistic.layers) < len(optimistic.layers)


def test_costly_breadth_keeps_fewer_nodes_per_layer(make_expander):
    # Each extra node costs as much as a verifier forward: only nodes of value >= C1 would pay for themselves.
    narrow = expand(make_expander, CastBudget(linear_prices(1.0, 0.0), 0.9, 0.0, 1.0))
    assert all(s.kept <= 1 for s in narrow.layers)
    wide = expand(make_expander, CastBudget(linear_prices(1e-6, 0.0), 0.9, 0.0, 1.0))
    assert max(s.kept for s in wide.layers) == LIMITS["max_breadth"]
