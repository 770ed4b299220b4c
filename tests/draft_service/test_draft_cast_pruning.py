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


def test_the_efficiency_rule_stops_where_a_layer_would_lower_tokens_per_cost(make_expander):
    """Layers cheap enough for C2 alone (each costs 0.1 of a verify step, C2 = 0.01) but the step already costs 1.5
    before any layer: a deep layer adds little value for its 0.1 and lowers the tree's expected tokens per unit of
    cost, so the efficiency rule stops sooner; a free step base (0) leaves C2 alone."""
    prices = linear_prices(0.0, 0.1)
    c2_alone = expand(make_expander, CastBudget(prices, 0.0, 0.01, 1.0))
    efficient = expand(make_expander, CastBudget(prices, 0.0, 0.01, 1.0, step_base_cost=1.5))
    assert 1 < len(efficient.layers) < len(c2_alone.layers)
    # Its stopping point: the last expanded layer still paid for itself against the tree so far.
    values = efficient.tree.values
    depths = efficient.tree.depths
    kept = [s.kept for s in efficient.layers]
    tokens, spent = 1.0, 1.5
    for d, k in enumerate(kept[:-1], start=1):
        layer_value = float(np.sort(values[depths == d])[::-1][:k].sum())
        tokens += layer_value
        assert layer_value / 0.1 >= tokens / spent  # alpha = 1, depth scales 1
        spent += 0.1
    # A higher measured acceptance per unit of value makes deep layers worth more: the tree goes deeper.
    trusting = expand(make_expander, CastBudget(prices, 0.0, 0.01, 1.0, step_base_cost=1.5, depth_scales=(4.0,)))
    assert len(trusting.layers) >= len(efficient.layers)


def test_cast_grows_no_node_that_the_returned_trees_would_trim(make_expander):
    """With max_returned_nodes = m, a node below the tree's m-th best value can never be returned, nor can its
    descendants: CAST does not expand it. The m nodes returned are the same as those of the whole tree, from fewer
    nodes drafted."""
    free = CastBudget(linear_prices(1e-6, 1e-6), 0.0, 0.0, 1.0)  # C1 and C2 keep everything: only the cut prunes
    expander = make_expander()
    whole = expander.expand([SequenceInput("a", np.asarray(PROMPT), 0)], Budget(**LIMITS, cast=free))[0][0]
    cut = expander.expand([SequenceInput("b", np.asarray(PROMPT), 0)],
                          Budget(**LIMITS, cast=free, max_returned_nodes=6))[0][0]
    assert whole.expanded_nodes == 1 + 4 + 4 * 16  # top-4 x depth 5, 4 kept per layer: 1 + 4 + 16 x 4
    assert cut.expanded_nodes < whole.expanded_nodes / 2
    best = whole.tree.top_m(6)
    assert len(cut.tree) == 6
    assert sorted(zip(cut.tree.depths.tolist(), cut.tree.tokens.tolist())) == \
        sorted(zip(best.depths.tolist(), best.tokens.tolist()))


def test_deep_acceptance_measured_high_grows_deeper_trees(make_expander):
    """The same budget, but the orchestrator measured that deep nodes are accepted far more often than their
    values say (scales rising with depth): C2 keeps expanding where one scale for all depths stopped."""
    prices = linear_prices(0.02, 0.1)
    flat = expand(make_expander, CastBudget(prices, 1.0, 1.0, 0.5, depth_scales=(1.5,)))
    deep = expand(make_expander, CastBudget(prices, 1.0, 1.0, 0.5, depth_scales=(1.5, 15.0, 150.0, 1500.0, 15000.0)))
    assert len(deep.layers) > len(flat.layers)
    assert deep.tree.max_depth > flat.tree.max_depth


def test_the_returned_trees_are_the_best_nodes_by_calibrated_value(make_expander):
    """Trimmed to m nodes, a tree keeps its best m by calibrated value (what the orchestrator ranks by), a tree."""
    from cast_core.selection import calibrated_values

    scales = (1.0, 10.0, 100.0, 1000.0)  # the tiny random draft is far less sure than a trained one
    free = CastBudget(linear_prices(1e-6, 1e-6), 0.0, 0.0, 1.0, depth_scales=scales)
    expander = make_expander()
    whole = expander.expand([SequenceInput("a", np.asarray(PROMPT), 0)], Budget(**LIMITS, cast=free))[0][0]
    cut = expander.expand([SequenceInput("b", np.asarray(PROMPT), 0)],
                          Budget(**LIMITS, cast=free, max_returned_nodes=8))[0][0]
    cut.tree.validate()
    best = whole.tree.top_m(8, calibrated_values(whole.tree, scales))
    assert sorted(zip(cut.tree.depths.tolist(), cut.tree.tokens.tolist())) == \
        sorted(zip(best.depths.tolist(), best.tokens.tolist()))
    assert cut.tree.max_depth > whole.tree.top_m(8).max_depth  # raw values would have kept a shallower tree


def test_with_sibling_scales_the_returned_trees_are_still_the_best_nodes_as_the_orchestrator_ranks_them(make_expander):
    """Siblings weighed 10x below top-1 children: the trimmed tree is the whole tree's best m by
    calibrated_values(tree, scales, sibling_scales), with the same keys on both sides (float-exact), and not what
    the per-depth scales alone keep."""
    from cast_core.selection import calibrated_values, top_children

    scales, siblings = (1.0, 10.0, 100.0, 1000.0), (0.1, 1.0, 10.0, 100.0)
    free = CastBudget(linear_prices(1e-6, 1e-6), 0.0, 0.0, 1.0, depth_scales=scales, sibling_scales=siblings)
    expander = make_expander()
    whole = expander.expand([SequenceInput("a", np.asarray(PROMPT), 0)], Budget(**LIMITS, cast=free))[0][0]
    cut = expander.expand([SequenceInput("b", np.asarray(PROMPT), 0)],
                          Budget(**LIMITS, cast=free, max_returned_nodes=8))[0][0]
    cut.tree.validate()
    keys = calibrated_values(whole.tree, scales, siblings)
    kept = whole.tree.top_m_indices(8, keys)
    best = whole.tree.subtree(kept)
    assert sorted(zip(cut.tree.depths.tolist(), cut.tree.tokens.tolist())) == \
        sorted(zip(best.depths.tolist(), best.tokens.tolist()))
    assert np.array_equal(calibrated_values(cut.tree, scales, siblings), keys[kept])  # the orchestrator's keys
    assert np.array_equal(top_children(cut.tree), top_children(whole.tree)[kept])  # each kept parent's top-1 kept
    per_depth = whole.tree.top_m(8, calibrated_values(whole.tree, scales))
    assert not np.array_equal(cut.tree.tokens, per_depth.tokens)  # the sibling scales changed the choice
    assert (~top_children(cut.tree)).sum() <= (~top_children(per_depth)).sum()  # towards top-1 children


def test_an_older_clients_one_scale_reads_as_before_and_bad_depth_scales_are_refused():
    """A client that sends value_scale and thresholds divided by it (no depth_scales) gets the rules it had; a depth
    scale that is not a finite number > 0 is InvalidArgument naming it."""
    import pytest

    from cast.v1 import draft_pb2
    from cast_core.errors import InvalidArgument
    from draft_service.servicer import budget_from_proto

    def budget(**cast):
        return draft_pb2.ExpandBudget(top_k=4, max_depth=5, max_breadth=4, cast=draft_pb2.CastBudget(
            node_buckets=[1], token_counts=[1], normalized_cost=[0.1], gain_mean=1.0, **cast))

    old = budget_from_proto(budget(breadth_threshold=0.5, depth_threshold=1.5, value_scale=2.0)).cast
    assert (old.breadth_threshold, old.depth_threshold, old.depth_scales) == (1.0, 3.0, (2.0,))
    new = budget_from_proto(budget(breadth_threshold=1.0, depth_threshold=1.0, value_scale=2.0,
                                   depth_scales=[1.5, 3.0])).cast
    assert (new.breadth_threshold, new.depth_threshold, new.depth_scales) == (1.0, 1.0, (1.5, 3.0))
    assert new.scale(1) == 1.5 and new.scale(7) == 3.0
    with pytest.raises(InvalidArgument) as info:
        budget_from_proto(budget(depth_scales=[1.0, 0.0]))
    assert info.value.field == "budget.cast.depth_scales[1]"
    assert new.sibling_scales == () and new.sibling_scale(2) == new.scale(2) == 3.0  # no sibling scales: as before


def test_sibling_scales_are_read_capped_by_the_top_1_scales_and_bad_ones_are_refused():
    """sibling_scales (field 10) weigh the children that are not their parent's top-1, each at most the top-1 scale
    of its depth; one that is not a finite number > 0, one without depth_scales, or more of them than max_depth and
    depth_scales have entries is InvalidArgument naming budget.cast.sibling_scales."""
    import pytest

    from cast.v1 import draft_pb2
    from cast_core.errors import InvalidArgument
    from draft_service.servicer import budget_from_proto

    def budget(**cast):
        return draft_pb2.ExpandBudget(top_k=4, max_depth=3, max_breadth=4, cast=draft_pb2.CastBudget(
            node_buckets=[1], token_counts=[1], normalized_cost=[0.1], gain_mean=1.0, **cast))

    cast = budget_from_proto(budget(depth_scales=[1.5, 3.0], sibling_scales=[0.5, 4.0])).cast
    assert cast.sibling_scales == (0.5, 4.0)
    assert (cast.sibling_scale(1), cast.sibling_scale(2), cast.sibling_scale(9)) == (0.5, 3.0, 3.0)
    for bad, field in (([1.0, -1.0], "budget.cast.sibling_scales[1]"),
                       ([float("nan")], "budget.cast.sibling_scales[0]"),
                       ([1.0, float("inf")], "budget.cast.sibling_scales[1]"),
                       ([0.0], "budget.cast.sibling_scales[0]"),
                       ([1.0] * 4, "budget.cast.sibling_scales")):  # more than max_depth 3 and depth_scales' 2
        with pytest.raises(InvalidArgument) as info:
            budget_from_proto(budget(depth_scales=[1.5, 3.0], sibling_scales=bad))
        assert info.value.field == field, bad
    with pytest.raises(InvalidArgument) as info:
        budget_from_proto(budget(value_scale=2.0, sibling_scales=[1.0]))
    assert info.value.field == "budget.cast.sibling_scales"


def test_the_depth_rule_weighs_the_next_layer_by_its_share_of_top_1_value():
    """C2 at the next depth: its top-1 scale where the kept layer's value is all in top-1 children, its sibling scale
    where it is all in siblings, mixed in between; without sibling_scales the share does not matter."""
    from draft_service.expansion import expand_another_layer

    prices = linear_prices(0.1, 0.0)  # forwarding 2 nodes costs 0.2
    split = CastBudget(prices, 0.0, 1.0, 1.0, depth_scales=(1.0, 3.0), sibling_scales=(1.0, 0.5))
    budget = Budget(**LIMITS, cast=split)
    # u = 0.1: expected 0.3 tokens at the top-1 scale, 0.05 at the siblings', against 1.0 * 0.2 of cost
    assert expand_another_layer(1, 2, 0.1, budget, 1, top_share=1.0)
    assert not expand_another_layer(1, 2, 0.1, budget, 1, top_share=0.0)
    assert not expand_another_layer(1, 2, 0.1, budget, 1, top_share=0.5)  # 0.175 < 0.2
    assert expand_another_layer(1, 2, 0.1, budget, 1, top_share=0.7)      # 0.225 >= 0.2
    old = Budget(**LIMITS, cast=CastBudget(prices, 0.0, 1.0, 1.0, depth_scales=(1.0, 3.0)))
    assert expand_another_layer(1, 2, 0.1, old, 1, top_share=0.0)
