import numpy as np

from cast_core.tree import TokenTree
from orchestrator.calibration import KIND_MASS, LIMITS, ValueCalibration


def chain(values: list[float]) -> TokenTree:
    n = len(values)
    return TokenTree.from_lists(range(n + 1), [-1, *range(n)], range(n + 1), [1.0, *values])


def path(accepted: int, bonus: int = 99) -> list[int]:
    """The committed tokens of a chain step that accepted its first `accepted` nodes (tokens 1..), + the bonus."""
    return [*range(1, accepted + 1), bonus]


def test_each_depth_learns_its_own_accepted_tokens_per_unit_of_value():
    """A chain whose values halve per layer, accepted to depth 3 of 4 every step: depth d's scale is what was
    accepted there per unit of value there (1/0.5, 1/0.25, 1/0.125, 0/0.0625), not one pooled figure."""
    calibration = ValueCalibration()
    for _ in range(200):
        calibration.observe([chain([0.5, 0.25, 0.125, 0.0625])], [path(3)])  # 3 accepted + the bonus token
    scales = calibration.scales(5)
    assert np.allclose(scales[:3], [2.0, 4.0, 8.0], rtol=0.06)  # a little prior left at the deep end
    assert scales[3] < scales[2] / 4  # never accepted at depth 4: far lower, yet bounded
    assert scales[3] >= LIMITS[0] and scales[4] == scales[3]  # depth 5, never verified: its prior, depth 4's
    assert 1.0 < calibration.scale < scales[2]  # the pooled scale sits between


def test_a_batch_counts_every_sequence_and_outliers_stay_within_bounds():
    calibration = ValueCalibration()
    calibration.observe([TokenTree.root_only(3)] * 4, [[7]] * 4)  # plain steps teach nothing
    assert calibration.scales(3) == [1.0, 1.0, 1.0]
    for _ in range(1000):
        calibration.observe([chain([1e-6, 1e-7])] * 8, [path(2)] * 8)  # accepted far beyond a tiny value
    assert all(LIMITS[0] <= s <= LIMITS[1] for s in calibration.scales(4))
    assert calibration.scales(2) == [LIMITS[1]] * 2


def test_depths_not_seen_yet_take_the_depth_above_and_little_evidence_moves_little():
    calibration = ValueCalibration()
    calibration.observe([chain([0.8])] * 8, [path(1)] * 8)  # batch 8, depth 1: 8 accepted per 6.4 of value
    pooled = (8 + 0.25) / (6.4 + 0.25)  # the first step counts at once
    assert abs(calibration.pooled_scales(1)[0] - pooled) < 1e-6
    assert abs(calibration.scales(1)[0] - (8 + KIND_MASS * pooled) / (6.4 + KIND_MASS)) < 1e-6  # top-1: nearly so
    deep = ValueCalibration()
    deep.observe([chain([0.8, 0.6, 0.45, 0.01])], [path(4)])  # one step, depth 4 accepted from a value of 0.01
    scales = deep.scales(6)
    pooled = deep.pooled_scales(6)
    assert pooled[3] < 3 * pooled[2]  # a tiny value is weak evidence: near its prior, not 100x
    assert scales[3] < 3.5 * scales[2]  # the top-1 scale's prior is the pooled one, which moved already
    assert scales[4] == scales[5] == scales[3]


def test_top_1_children_and_siblings_learn_their_own_scales_from_the_accepted_path():
    """Root with a top-1 child (value 0.6, token 1) and a sibling (0.3, token 2), each with one child (0.4 under 1,
    token 3; 0.1 under 2, token 4) and a sibling of it (0.15 under 1, token 5): the top-1 path is accepted by 9
    sequences of 10, the sibling at depth 1 once (then its own top child). The committed tokens tell which node was
    accepted: siblings, accepted rarely for their values, get a low scale, top-1 children a high one; the pooled
    view (one scale per depth, as before) sits between and would overvalue the siblings."""
    tree = TokenTree.from_lists([0, 1, 2, 3, 5, 4], [-1, 0, 0, 1, 1, 2], [0, 1, 1, 2, 2, 2],
                                [1.0, 0.6, 0.3, 0.4, 0.15, 0.1])
    calibration = ValueCalibration()
    for _ in range(200):  # batches of 10 sequences
        calibration.observe([tree] * 10, [[2, 4, 99]] + [[1, 3, 99]] * 9)
    top, siblings = calibration.scales(3), calibration.sibling_scales(3)
    # depth 1: top-1 accepted 0.9 per 0.6 of value (1.5), siblings 0.1 per 0.3 (0.33)
    assert np.allclose([top[0], siblings[0]], [1.5, 0.1 / 0.3], rtol=0.1)
    # depth 2: top-1 children 1.0 per 0.9 * 0.4 + 0.1 * 0.1 of value a step, siblings never accepted
    assert np.isclose(top[1], 1.0 / 0.5, rtol=0.1) and siblings[1] < 0.5 * siblings[0] + 0.1
    assert all(LIMITS[0] <= s <= t for s, t in zip(siblings, top))
    pooled = (0.9 + 0.1) / (0.6 + 0.3)
    assert siblings[0] < pooled < top[0]


def test_sibling_scales_start_from_one_and_never_pass_the_top_1_scale():
    calibration = ValueCalibration()
    assert calibration.sibling_scales(3) == calibration.scales(3) == [1.0, 1.0, 1.0]  # nothing learned: the draft
    # Siblings measured above the top-1 children (a draft that ranks its children badly) are capped by them.
    calibration = ValueCalibration(accepted=[1.0, 1.0], value=[1.0, 1.0], sibling_accepted=[8.0], sibling_value=[1.0])
    assert calibration.sibling_scales(2) == calibration.scales(2)


def test_one_step_through_a_sibling_does_not_crash_the_top_1_scales():
    """Issue 21's collapse in replay: a step whose accepted path leaves the top-1 children at depth 3 (a sibling
    there, then its top child) put the top-1 scale at depth 3 at 0.42x the pooled one, and every deeper one with it,
    so the next trees stopped after one layer. One step moves a kind's scale only so far from the pooled one."""
    tree = TokenTree.from_lists([0, 1, 2, 3, 4, 5, 6, 7], [-1, 0, 0, 1, 1, 3, 3, 6], [0, 1, 1, 2, 2, 3, 3, 4],
                                [1.0, 0.8, 0.1, 0.6, 0.15, 0.3, 0.25, 0.2])
    calibration = ValueCalibration()
    calibration.observe([tree], [[1, 3, 6, 7, 99]])
    pooled, top = calibration.pooled_scales(6), calibration.scales(6)
    assert all(0.75 * p <= t <= 1.35 * p for p, t in zip(pooled, top))
    assert all(s <= t for s, t in zip(calibration.sibling_scales(6), top))
