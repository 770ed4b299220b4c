import numpy as np

from cast_core.tree import TokenTree
from orchestrator.calibration import LIMITS, RankCalibration, ValueCalibration


def chain(values: list[float]) -> TokenTree:
    n = len(values)
    return TokenTree.from_lists(range(n + 1), [-1, *range(n)], range(n + 1), [1.0, *values])


def test_each_depth_learns_its_own_accepted_tokens_per_unit_of_value():
    """A chain whose values halve per layer, accepted to depth 3 of 4 every step: depth d's scale is what was
    accepted there per unit of value there (1/0.5, 1/0.25, 1/0.125, 0/0.0625), not one pooled figure."""
    calibration = ValueCalibration()
    for _ in range(200):
        calibration.observe([chain([0.5, 0.25, 0.125, 0.0625])], [4])  # 3 accepted + the bonus token
    scales = calibration.scales(5)
    assert np.allclose(scales[:3], [2.0, 4.0, 8.0], rtol=0.06)  # a little prior left at the deep end
    assert scales[3] < scales[2] / 4  # never accepted at depth 4: far lower, yet bounded
    assert scales[3] >= LIMITS[0] and scales[4] == scales[3]  # depth 5, never verified: its prior, depth 4's
    assert 1.0 < calibration.scale < scales[2]  # the pooled scale sits between


def test_a_batch_counts_every_sequence_and_outliers_stay_within_bounds():
    calibration = ValueCalibration()
    calibration.observe([TokenTree.root_only(3)] * 4, [1] * 4)  # plain steps teach nothing
    assert calibration.scales(3) == [1.0, 1.0, 1.0]
    for _ in range(1000):
        calibration.observe([chain([1e-6, 1e-7])] * 8, [3] * 8)  # accepted far beyond a tiny value
    assert all(LIMITS[0] <= s <= LIMITS[1] for s in calibration.scales(4))
    assert calibration.scales(2) == [LIMITS[1]] * 2


def test_depths_not_seen_yet_take_the_depth_above_and_little_evidence_moves_little():
    calibration = ValueCalibration()
    calibration.observe([chain([0.8])] * 8, [2] * 8)  # batch 8, depth 1: 8 accepted per 6.4 of value
    assert abs(calibration.scales(1)[0] - (8 + 0.25) / (6.4 + 0.25)) < 1e-6  # the first step counts at once
    deep = ValueCalibration()
    deep.observe([chain([0.8, 0.6, 0.45, 0.01])], [5])  # one step, depth 4 accepted from a value of 0.01
    scales = deep.scales(6)
    assert scales[3] < 3 * scales[2]  # a tiny value is weak evidence: near its prior, not 100x
    assert scales[4] == scales[5] == scales[3]


def test_each_rank_learns_what_its_nodes_returned_per_unit_of_value():
    # Tree 1: root -> a (token 5, .6) -> c (7, .5), d (8, .1); root -> b (6, .3) -> e (7, .2). The target took b then
    # e: c has e's token at e's depth but under a, which was not accepted. Ranks by value: a, c, b, e, d. Tree 2, a
    # chain of one node, accepted: its rank 1 counts beside tree 1's.
    branching = TokenTree.from_lists([0, 5, 6, 7, 8, 7], [-1, 0, 0, 1, 1, 2], [0, 1, 1, 2, 2, 2],
                                     [1.0, 0.6, 0.3, 0.5, 0.1, 0.2])
    one = chain([0.9])
    ranks = RankCalibration()
    ranks.observe([branching, one], [branching.values.astype(float), one.values.astype(float)], [[6, 7, 9], [1, 4]])
    # buckets: rank 1 (a, and the chain's node), ranks 2-3 (c, b), ranks 4-7 (e, d)
    assert np.allclose(ranks.value[:3], [0.6 + 0.9, 0.5 + 0.3, 0.2 + 0.1])
    assert np.allclose(ranks.accepted[:3], [1, 1, 1])
    assert np.all(ranks.value[3:] == 0)  # ranks not verified teach nothing...
    factors = ranks.factors()
    assert np.all(factors[3:] == 1.0)  # ... and keep their prior
    assert factors[2] > factors[1] > factors[0]  # 1 accepted of 0.3, of 0.8, of 1.5
    # The cut's utilities: each rank's value times its bucket's factor (ranks 1 | 2, 3 | 4).
    utilities = np.array([1.0, 1.6, 2.1, 2.3, 2.4])  # a tree's root, then values .6, .5, .2, .1
    gains = np.array([0.6 * factors[0], 0.5 * factors[1], 0.2 * factors[1], 0.1 * factors[2]])
    assert np.allclose(ranks.correct(utilities), 1.0 + np.concatenate([[0.0], np.cumsum(gains)]))
