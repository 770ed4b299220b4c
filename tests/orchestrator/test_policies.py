import math

import numpy as np

from cast_core.cost_table import CostTable
from cast_core.selection import GainBuffer, batch_gains, calibrated_values, kept_layer_utilities
from cast_core.tree import TokenTree
from orchestrator.calibration import LIMITS, ValueCalibration
from orchestrator.costs import CostModel
from orchestrator.planner import Planner
from orchestrator.policies import POLICIES

GRID = dict(batch_sizes=(1, 8), context_buckets=(128, 1024), token_counts=(1, 8, 64))


def chain(values: list[float]) -> TokenTree:
    """Root, then one node per layer with the given values."""
    n = len(values)
    return TokenTree.from_lists(range(n + 1), [-1, *range(n)], range(n + 1), [1.0, *values])


def test_a_batched_step_pushes_one_gain_per_layer_not_one_per_sequence():
    utilities = kept_layer_utilities(chain([0.8, 0.4, 0.2]), [1, 1, 0])
    assert np.allclose(utilities, [0.8, 0.4, 0.2])  # float32 values
    gains = batch_gains(GainBuffer.full_of_ones(8), [utilities] * 8)  # 8 sequences, 3 layers: gains 0.5 and 0.5
    # Two gains of the batch average entered; the buffer still remembers six earlier ones.
    assert gains.gains == (1.0,) * 6 + (0.5, 0.5)


def uniform(scale: float) -> ValueCalibration:
    """A calibration that measured `scale` tokens per unit of value at every depth, on plenty of evidence."""
    return ValueCalibration(accepted=[scale * 1e9] * 16, value=[1e9] * 16)


def calibrated(scale: float) -> Planner:
    planner = Planner(POLICIES["cast"])
    planner.calibration = uniform(scale)
    return planner


def test_a_higher_value_calibration_verifies_more_of_the_tree():
    costs = CostModel(verify=CostTable.linear(2.0, 5.0, **GRID), draft=CostTable.linear(0.05, 1.0, **GRID))
    trees = [chain([0.6, 0.35, 0.2, 0.1])] * 8
    plain_values = len(calibrated(1.0).select(trees, costs, 8, 100)[0])
    scaled = len(calibrated(2.0).select(trees, costs, 8, 100)[0])
    assert scaled > plain_values
    budget = calibrated(2.0).price_budget(costs, 8, 100)
    cast = POLICIES["cast"].cast
    assert np.allclose(budget.cast.depth_scales, [2.0] * POLICIES["cast"].max_depth)  # the draft weighs by them
    assert np.isclose(budget.cast.depth_threshold, cast.depth_threshold)
    assert np.isclose(budget.cast.breadth_threshold, cast.breadth_threshold)


def test_deep_acceptance_measured_high_verifies_deeper_trees():
    """Trees with a deep chain and shallow siblings: where deep nodes were measured to be accepted far more often
    than their values say, reranking verifies the deep chain; with one scale for every depth, the siblings."""
    costs = CostModel(verify=CostTable.linear(2.0, 5.0, **GRID), draft=CostTable.linear(0.05, 1.0, **GRID))
    # root; 1: 0.5 (chain) 2: 0.3 3: 0.2 (siblings at depth 1); then the chain 4..8 below node 1
    tree = TokenTree.from_lists(range(9), [-1, 0, 0, 0, 1, 4, 5, 6, 7], [0, 1, 1, 1, 2, 3, 4, 5, 6],
                                [1.0, 0.5, 0.3, 0.2, 0.3, 0.18, 0.11, 0.07, 0.04])
    flat, deep = calibrated(1.5), Planner(POLICIES["cast"])
    deep.calibration = ValueCalibration(accepted=[0.9e9, 0.85e9, 0.8e9, 0.75e9, 0.7e9, 0.65e9],
                                        value=[1e9, 0.6e9, 0.36e9, 0.22e9, 0.14e9, 0.08e9])
    shallow_tree = flat.select([tree], costs, 1, 100)[0]
    deep_tree = deep.select([tree], costs, 1, 100)[0]
    assert deep_tree.max_depth > shallow_tree.max_depth
    deep_tree.validate()  # still a tree: a child never outranks its parent


def test_a_budget_carries_a_scale_per_depth_within_bounds():
    costs = CostModel(verify=CostTable.linear(2.0, 5.0, **GRID), draft=CostTable.linear(0.05, 1.0, **GRID))
    planner = Planner(POLICIES["cast"])
    planner.learn_step(1, True, [TokenTree.from_lists(range(4), [-1, 0, 1, 2], [0, 1, 2, 3], [1.0, 1e-4, 1e-5, 1e-6])],
                       [4], 10.0, True)
    for _ in range(100):
        planner.learn_step(1, True, [TokenTree.from_lists(range(4), [-1, 0, 1, 2], [0, 1, 2, 3],
                                                          [1.0, 1e-4, 1e-5, 1e-6])], [4], 10.0, True)
    scales = list(planner.price_budget(costs, 1, 100).cast.depth_scales)
    assert len(scales) == POLICIES["cast"].max_depth
    assert all(LIMITS[0] <= s <= LIMITS[1] for s in scales) and scales[0] == LIMITS[1]


def test_the_efficiency_rule_is_on_where_the_verifier_runs_on_a_gpu():
    def step_base(device: str) -> float:
        costs = CostModel(verify=CostTable.linear(0.01, 7.0, **GRID, device=device),
                          draft=CostTable.linear(0.05, 1.0, **GRID, device=device))
        return Planner(POLICIES["cast"]).price_budget(costs, 1, 100).cast.step_base_cost

    assert step_base("NVIDIA H100 80GB HBM3") > 1.0  # on a GPU: the step's base cost is sent
    assert step_base("cpu") == 0.0                  # on a CPU: C2 alone


def test_trees_come_back_trimmed_to_what_the_policy_may_verify():
    costs = CostModel(verify=CostTable.linear(2.0, 5.0, **GRID), draft=CostTable.linear(0.05, 1.0, **GRID))
    for name in ("cast", "eagle2", "chain"):
        budget = Planner(POLICIES[name]).price_budget(costs, 1, 100)
        assert budget.max_returned_nodes == POLICIES[name].verify_tokens > 1, name


def test_cast_asks_for_no_more_nodes_nor_layers_than_its_reranking_lately_verified_with_room_to_grow():
    costs = CostModel(verify=CostTable.linear(1.0, 5.0, **GRID), draft=CostTable.linear(0.05, 1.0, **GRID))
    planner = Planner(POLICIES["cast"])
    verified = len(planner.select([chain([0.9, 0.8, 0.6, 0.3, 0.1, 0.05, 0.02])] * 2, costs, 2, 100)[0])
    assert 1 < verified and math.ceil(1.5 * verified) + 2 < POLICIES["cast"].verify_tokens
    assert planner.price_budget(costs, 2, 100).max_returned_nodes == math.ceil(1.5 * verified) + 2
    assert planner.price_budget(costs, 1, 100).max_returned_nodes == POLICIES["cast"].verify_tokens  # no step at 1 yet
    # nor deeper than it verified, plus 2 (a chain's m nodes reach depth m - 1)
    assert planner.price_budget(costs, 2, 100).max_depth == min(verified - 1 + 2, POLICIES["cast"].max_depth)
    assert planner.price_budget(costs, 1, 100).max_depth == POLICIES["cast"].max_depth


def test_a_dearer_draft_makes_cast_verify_more_of_what_it_drafted():
    """The Expand is paid whatever the cut: the dearer it was, the more nodes are worth verifying for it."""
    fine = dict(GRID, token_counts=tuple(range(1, 17)))  # a verifier whose cost grows with every node
    costs = CostModel(verify=CostTable.linear(1.0, 5.0, **fine), draft=CostTable.linear(0.05, 1.0, **fine))
    trees = [chain([0.8, 0.6, 0.45, 0.3, 0.2, 0.12, 0.08, 0.05])]
    cheap = len(Planner(POLICIES["cast"]).select(trees, costs, 1, 100, draft_ms=0.0)[0])
    dear = len(Planner(POLICIES["cast"]).select(trees, costs, 1, 100, draft_ms=10.0)[0])
    assert dear > cheap


def test_the_next_drafts_are_bounded_by_the_cut_their_step_would_choose_unpaid_not_by_one_a_dear_draft_inflated():
    """A dear Expand makes the cut verify more of it (above); grown from that cut, the next drafts returned and grew
    more nodes, which made the next Expand dearer still (CPU, batch 8: 66 nodes expanded and 16 verified, 107 ms for
    3.8 tokens; reports/cast-vs-fixed/ round 13)."""
    fine = dict(GRID, token_counts=tuple(range(1, 17)))
    costs = CostModel(verify=CostTable.linear(1.0, 5.0, **fine), draft=CostTable.linear(0.05, 1.0, **fine))
    trees = [chain([0.8, 0.6, 0.45, 0.3, 0.2, 0.12, 0.08, 0.05])]
    cheap, dear = Planner(POLICIES["cast"]), Planner(POLICIES["cast"])
    verified_cheap = len(cheap.select(trees, costs, 1, 100, draft_ms=0.0)[0])
    verified_dear = len(dear.select(trees, costs, 1, 100, draft_ms=10.0)[0])
    assert verified_dear > verified_cheap  # the step verifies more of the dear draft it paid for ...
    # ... but the next drafts may return no more than after the cheap one
    assert dear.price_budget(costs, 1, 100).max_returned_nodes == cheap.price_budget(costs, 1, 100).max_returned_nodes


def random_tree(rng: np.random.Generator, n: int, low: float) -> TokenTree:
    """n nodes, each under a random earlier one, a value its parent's times a factor in [low, 1) (as a draft's)."""
    parents, depths, values = [-1], [0], [1.0]
    for i in range(1, n):
        p = int(rng.integers(0, i))
        parents.append(p)
        depths.append(depths[p] + 1)
        values.append(values[p] * float(rng.uniform(low, 1.0)))
    return TokenTree.from_lists(range(n), parents, depths, values)


def test_a_tree_trimmed_to_the_policys_cap_selects_what_the_whole_tree_does():
    # The draft returns each tree's best verify_tokens nodes. The reranking rule (C3) then scans those alone, not
    # every expanded node; the cap bounds its count anyway, and on random trees under GPU-like step costs (flat up
    # to 32 tokens a sequence, then dearer) and linear CPU-like ones the same nodes are verified.
    counts = (1, 8, 16, 32, 64, 128, 256, 512)
    gpu = np.array([[[7.0, 7.0, 7.1, 7.3, 7.6, 9.0, 12.0, 20.0]], [[7.2, 7.6, 8.0, 9.0, 11.0, 15.0, 24.0, 40.0]]])
    tables = [CostTable("H100", "t", "bf16", (1, 8), (4096,), counts, gpu),
              CostTable.linear(0.4, 5.0, batch_sizes=(1, 8), context_buckets=(4096,), token_counts=counts)]
    rng = np.random.default_rng(0)
    for trial in range(80):
        costs = CostModel(verify=tables[trial % 2], draft=CostTable.linear(0.05, 1.0, **GRID))
        batch = (1, 8)[trial // 2 % 2]
        for name in ("cast", "eagle2"):
            planner = Planner(POLICIES[name])
            planner.calibration = ValueCalibration(accepted=rng.uniform(0.5, 2.0, 8).tolist(), value=[1.0] * 8)
            whole = [random_tree(rng, int(rng.integers(2, 400)), float(rng.uniform(0.05, 0.9))) for _ in range(batch)]
            scales = planner.depth_scales() if planner.policy.cast else []  # the draft ranks CAST's nodes alike
            trimmed = [t.top_m(planner.policy.verify_tokens, calibrated_values(t, scales)) for t in whole]
            expected = planner.select(whole, costs, batch, 300)
            got = planner.select(trimmed, costs, batch, 300)
            for e, g in zip(expected, got, strict=True):
                assert np.array_equal(e.tokens, g.tokens) and np.array_equal(e.parents, g.parents)


def test_fixed_shapes_are_parsed_into_the_trees_they_name():
    from orchestrator.policies import resolve_policy

    chain6 = resolve_policy("chain:6", "cast")
    assert (chain6.top_k, chain6.max_depth, chain6.max_breadth, chain6.verify_tokens) == (1, 6, 1, 7)
    assert chain6.tree_nodes == 7 and chain6.uses_draft and not chain6.learns
    tree = resolve_policy("tree:4x5/16", "cast")
    assert (tree.name, tree.top_k, tree.max_depth, tree.max_breadth, tree.verify_tokens) == ("tree:4x5/16", 4, 5, 4, 16)
    assert tree.tree_nodes == 1 + 4 + 4 * 16  # layer 1: 4 children of the root; then 4 kept x 4 children a layer
    assert resolve_policy("chain:06", "cast").name == "chain:6"  # one canonical name: one planner


def test_a_bad_shape_is_invalid_argument_naming_the_field_and_the_rule():
    import pytest

    from cast_core.errors import InvalidArgument
    from orchestrator.policies import resolve_policy

    for spec, rule in [("chain:0", "depth 0 is outside [1, 16]"), ("tree:9x5/16", "top-K 9 is outside [1, 8]"),
                       ("tree:4x5/1", "nodes verified 1 is outside [2, 128]"), ("tree:4x5", "tree:KxD/N"),
                       ("chain:x", "chain:D"), ("beam", "unknown policy")]:
        with pytest.raises(InvalidArgument) as info:
            resolve_policy(spec, "cast", field="cast.policy")
        assert info.value.field == "cast.policy" and rule in str(info.value), spec


def test_a_step_loop_keeps_few_planners_for_fixed_shapes_and_cast_for_good():
    from orchestrator.planner import Planners
    from orchestrator.policies import resolve_policy

    planners = Planners(max_fixed=4)
    cast = planners.get(POLICIES["cast"])
    cast.calibration = uniform(1.7)  # learned
    for depth in range(1, 17):
        for k in range(2, 9):
            planners.get(resolve_policy(f"tree:{k}x{depth}/32", "cast"))
    assert len(planners) == 1 + 4  # ever new shapes do not grow it
    assert planners.get(POLICIES["cast"]) is cast and abs(cast.calibration.scale - 1.7) < 1e-6
    recent = planners.get(resolve_policy("tree:8x16/32", "cast"))
    assert planners.get(resolve_policy("tree:8x16/32", "cast")) is recent  # a shape in use keeps its planner
