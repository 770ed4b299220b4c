"""CAST selection rule (Algorithm 1) and the breadth / depth / reranking decisions built on it."""

from __future__ import annotations

import numpy as np
import pytest

from cast_core.cost_table import CostTable
from cast_core.selection import (
    CastParams,
    GainBuffer,
    batch_topk_utilities,
    breadth_keep,
    layer_gains,
    layer_utility,
    rerank_count,
    select_count,
    should_expand,
    theorem_4_1_breadth_threshold,
)

# ---- the selection rule ------------------------------------------------------------------------------------------


def test_select_count_hand_computed():
    # marginal ratios against the previous point: (3-2)/1 = 1, (3.5-3)/1 = 0.5, (3.7-3.5)/1 = 0.2
    utilities = np.array([2.0, 3.0, 3.5, 3.7])
    costs = np.array([1.0, 2.0, 3.0, 4.0])
    assert select_count(utilities, costs, threshold=1.0) == 2  # 1 >= 1 accepted (at or above), 0.5 not
    assert select_count(utilities, costs, threshold=0.5) == 3
    assert select_count(utilities, costs, threshold=0.2) == 4
    assert select_count(utilities, costs, threshold=5.0) == 1  # min_keep
    assert select_count(utilities, costs, threshold=5.0, min_keep=0) == 0  # from the origin: 2/1 < 5
    assert select_count(utilities, costs, threshold=2.0, min_keep=0) == 1  # 2/1 >= 2, then 1/1 < 2


def test_select_count_measures_against_last_accepted_point():
    # A price jump at k=3 (a new tile), then free items: k=3 alone fails (0.3/3 = 0.1 < 0.25), but k=5
    # against k'=2 passes ((0.3+0.3+0.3)/3 = 0.3 >= 0.25): the free items after the jump pay for it.
    utilities = np.array([1.0, 2.0, 2.3, 2.6, 2.9])
    costs = np.array([1.0, 1.0, 4.0, 4.0, 4.0])
    assert select_count(utilities, costs, threshold=0.25) == 5
    assert select_count(utilities, costs, threshold=0.31) == 2


def test_select_count_cost_that_does_not_increase_is_free():
    utilities = np.array([1.0, 1.1, 1.2, 1.25])
    flat = np.ones(4)
    assert select_count(utilities, flat, threshold=1e9) == 4
    decreasing = np.array([3.0, 2.0, 2.0, 1.0])  # a noisy profile can dip: still free, never a negative ratio
    assert select_count(utilities, decreasing, threshold=1e9) == 4
    # a plateau inside rising costs: k=3 is free against k'=2
    assert select_count(utilities, np.array([1.0, 2.0, 2.0, 3.0]), threshold=0.1) == 3


def test_select_count_rejects_bad_input():
    with pytest.raises(ValueError):
        select_count(np.array([1.0, 0.5]), np.array([1.0, 2.0]), 1.0)  # utilities decrease
    with pytest.raises(ValueError):
        select_count(np.array([1.0, 2.0]), np.array([1.0]), 1.0)  # lengths differ
    with pytest.raises(ValueError):
        select_count(np.array([]), np.array([]), 1.0)  # nothing to keep, but min_keep = 1
    with pytest.raises(ValueError):
        select_count(np.array([1.0, np.nan]), np.array([1.0, 2.0]), 1.0)
    assert select_count(np.array([]), np.array([]), 1.0, min_keep=0) == 0


def test_cast_params_defaults_and_validation():
    params = CastParams()
    assert (params.breadth_threshold, params.depth_threshold, params.rerank_threshold) == (1.0, 1.0, 1.0)  # the sweeps' pick
    assert params.gain_buffer_size >= 1
    with pytest.raises(ValueError):
        CastParams(breadth_threshold=-1.0)
    with pytest.raises(ValueError):
        CastParams(rerank_threshold=float("nan"))
    with pytest.raises(ValueError):
        CastParams(gain_buffer_size=0)
    with pytest.raises(ValueError):
        CastParams(gain_buffer_size=2.5)  # type: ignore[arg-type]


# ---- breadth pruning (C1) ----------------------------------------------------------------------------------------


def test_batch_utilities_over_ragged_trees():
    # three sequences with different trees: 3, 1 and 2 candidates, given unsorted
    values = [np.array([0.1, 0.5, 0.3]), np.array([0.9]), np.array([0.2, 0.4])]
    # top-1 sums 0.5, 0.9, 0.4; top-2 0.8, 0.9, 0.6; top-3 0.9, 0.9, 0.6
    np.testing.assert_allclose(batch_topk_utilities(values), [1.8 / 3, 2.3 / 3, 2.4 / 3])
    np.testing.assert_allclose(batch_topk_utilities(np.array([0.2, 0.7])), [0.7, 0.9])  # one sequence


def test_breadth_keep_on_a_batch_of_different_trees():
    values = [np.array([0.1, 0.5, 0.3]), np.array([0.9]), np.array([0.2, 0.4])]
    costs = np.array([0.1, 0.2, 0.3])  # normalised draft cost for k = 1, 2, 3 new tokens
    # marginal utility 0.5/3 then 0.1/3 per 0.1 of cost: ratios 1.667 and 0.333
    assert breadth_keep(values, costs, threshold=1.6) == 2
    assert breadth_keep(values, costs, threshold=0.3) == 3
    assert breadth_keep(values, costs, threshold=2.0) == 1
    assert breadth_keep(values, np.array([0.1, 0.2, 0.3, 0.4, 0.5]), threshold=0.3) == 3  # longer costs: fine
    with pytest.raises(ValueError):
        breadth_keep(values, np.array([0.1, 0.2]), threshold=1.0)  # too few costs


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("top_k", [1, 2, 4, 8])
def test_theorem_4_1_linear_cost_gives_eagle2_fixed_top_k(seed, top_k):
    # Theorem 4.1: c_k = lam*k + delta and C1 = sum_j v_i^(j)(K) / (B*lam) make breadth pruning keep K.
    rng = np.random.default_rng(seed)
    batch = int(rng.integers(1, 6))
    # ragged trees, each with more than K candidates; values as products of probabilities, so in (0, 1]
    values = [rng.random(int(rng.integers(top_k + 1, top_k + 12))) ** 3 for _ in range(batch)]
    lam, delta = float(rng.uniform(0.01, 0.5)), float(rng.uniform(0.0, 2.0))
    longest = max(v.shape[0] for v in values)
    table = CostTable.linear(lam, delta, token_counts=range(1, longest + 1))
    costs = table.costs_for_counts(batch=1, context=1, max_tokens=longest)  # c_k = lam*k + delta
    c1 = theorem_4_1_breadth_threshold(values, top_k, lam)
    assert breadth_keep(values, costs, c1) == top_k


# ---- depth pruning (C2) ------------------------------------------------------------------------------------------


def test_gain_buffer_fifo_starts_full_of_ones():
    buffer = GainBuffer.full_of_ones(3)
    assert buffer.gains == (1.0, 1.0, 1.0) and buffer.alpha == 1.0 and buffer.size == 3
    buffer = buffer.push(0.4)
    assert buffer.gains == (1.0, 1.0, 0.4)
    assert buffer.alpha == pytest.approx(0.8)
    buffer = buffer.extend([0.1, 0.2, 0.3])  # the 1s and 0.4 fall out
    assert buffer.gains == (0.1, 0.2, 0.3)
    assert buffer.alpha == pytest.approx(0.2)
    assert GainBuffer().size == CastParams().gain_buffer_size
    with pytest.raises(ValueError):
        GainBuffer.full_of_ones(0)


def test_layer_utilities_and_gains():
    # batch of two: layer utilities are batch averages of kept values
    u0 = layer_utility([np.array([1.0]), np.array([1.0])])
    u1 = layer_utility([np.array([0.6, 0.3]), np.array([0.5])])
    u2 = layer_utility([np.array([0.3]), np.array([0.0])])
    assert (u0, u1, u2) == pytest.approx((1.0, 0.7, 0.15))
    assert layer_gains([u0, u1, u2]) == pytest.approx([0.7, 0.15 / 0.7])
    assert layer_gains([0.5, 0.0, 0.3]) == pytest.approx([0.0])  # u = 0 gives no evidence for the next ratio


def test_should_expand():
    # alpha * u / c against C2: 0.5 * 0.6 / 0.1 = 3
    assert should_expand(alpha=0.5, utility=0.6, cost=0.1, threshold=3.0)  # at the threshold: expand
    assert not should_expand(alpha=0.5, utility=0.6, cost=0.1, threshold=3.01)
    assert not should_expand(alpha=0.5, utility=0.6, cost=0.2, threshold=3.0)  # dearer draft: stop
    assert should_expand(alpha=0.5, utility=0.6, cost=0.0, threshold=3.0)  # free: expand
    assert not should_expand(alpha=0.0, utility=0.6, cost=0.1, threshold=3.0)  # gains died out


# ---- reranking (C3) ----------------------------------------------------------------------------------------------


def _tree_values(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.concatenate([[1.0], rng.random(n - 1) ** 2])  # root first, value 1


def test_rerank_returns_root_only_when_costs_explode():
    values = _tree_values(np.random.default_rng(0), 20)
    exploding = 1.0 + 1e6 * np.arange(20)  # c_1 = 1, then a million steps per node
    assert rerank_count(values, exploding, threshold=2.5) == 1


def test_rerank_returns_all_when_costs_are_flat():
    values = _tree_values(np.random.default_rng(1), 20)
    assert rerank_count(values, np.ones(20), threshold=2.5) == 20
    assert rerank_count(values, np.ones(20), threshold=1e12) == 20


def test_rerank_hand_computed_with_a_verifier_table():
    # verifier f(1, ctx, n) for n = 1, 2, 4, 8: 10, 11, 12, 20 ms -> c_k = 1, 1.1, 1.2, 1.2, 2, 2, 2, 2
    table = CostTable("d", "m", "f", (1,), (1024,), (1, 2, 4, 8), [[[10.0, 11.0, 12.0, 20.0]]])
    costs = table.normalized_costs(batch=1, context=500, max_tokens=8)
    np.testing.assert_allclose(costs, [1, 1.1, 1.2, 1.2, 2, 2, 2, 2])
    values = np.array([1.0, 0.9, 0.5, 0.3, 0.2, 0.2, 0.1, 0.1])
    # k=2: 0.9/0.1 = 9; k=3: 0.5/0.1 = 5; k=4 free; k=5..8 vs k'=4: 0.2/0.8, 0.4/0.8, 0.5/0.8, 0.6/0.8 = 0.75
    assert rerank_count(values, costs, threshold=2.5) == 4
    assert rerank_count(values, costs, threshold=0.75) == 8
    # k=3 alone fails (5 < 6) but shares its bucket with k=4: against k'=2, (0.5+0.3)/0.1 = 8 >= 6
    assert rerank_count(values, costs, threshold=6.0) == 4
    assert rerank_count(values, costs, threshold=9.0) == 2  # 9 >= 9, then 5, 8, 1.0/0.9, ... all below
    assert rerank_count(values, costs, threshold=10.0) == 1  # best chord from k'=1 is 1.7/0.2 = 8.5


def test_rerank_batch_shares_one_m():
    values = [np.array([1.0, 0.8, 0.1]), np.array([1.0, 0.6])]
    costs = np.array([1.0, 1.2, 1.4])
    # u = (1+1)/2, (1.8+1.6)/2, (1.9+1.6)/2 -> marginals 0.7 and 0.05 per 0.2 of cost: ratios 3.5 and 0.25
    assert rerank_count(values, costs, threshold=2.5) == 2
    assert rerank_count(values, costs, threshold=0.25) == 3
