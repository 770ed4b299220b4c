import numpy as np

from cast_core.cost_table import CostTable
from cast_core.selection import GainBuffer, kept_layer_utilities
from cast_core.tree import TokenTree
from orchestrator.costs import CostModel
from orchestrator.policies import POLICIES, update_gains

GRID = dict(batch_sizes=(1, 8), context_buckets=(128, 1024), token_counts=(1, 8, 64))


def chain(values: list[float]) -> TokenTree:
    """Root, then one node per layer with the given values."""
    n = len(values)
    return TokenTree.from_lists(range(n + 1), [-1, *range(n)], range(n + 1), [1.0, *values])


def test_a_batched_step_pushes_one_gain_per_layer_not_one_per_sequence():
    utilities = kept_layer_utilities(chain([0.8, 0.4, 0.2]), [1, 1, 0])
    assert np.allclose(utilities, [0.8, 0.4, 0.2])  # float32 values
    gains = update_gains(GainBuffer.full_of_ones(8), [utilities] * 8)  # 8 sequences, 3 layers: gains 0.5 and 0.5
    # Two gains of the batch average entered; the buffer still remembers six earlier ones.
    assert gains.gains == (1.0,) * 6 + (0.5, 0.5)


def test_a_higher_acceptance_scale_verifies_more_of_the_tree():
    costs = CostModel(verify=CostTable.linear(2.0, 5.0, **GRID), draft=CostTable.linear(0.05, 1.0, **GRID))
    trees = [chain([0.6, 0.35, 0.2, 0.1])] * 8
    cast = POLICIES["cast"]
    plain_values = len(cast.select(trees, costs, 8, 100)[0])
    scaled = len(cast.select(trees, costs, 8, 100, value_scale=2.0)[0])
    assert scaled > plain_values
    budget = cast.budget(8, costs, 8, 100, GainBuffer.full_of_ones(8), value_scale=2.0)
    assert np.isclose(budget.cast.depth_threshold, cast.cast.depth_threshold / 2.0)
    assert np.isclose(budget.cast.breadth_threshold, cast.cast.breadth_threshold / 2.0)


def test_the_efficiency_rule_is_on_where_the_verifier_runs_on_a_gpu_unless_configured():
    from dataclasses import replace

    from cast_core.selection import CastParams

    def step_base(device: str, efficient_depth: bool | None) -> float:
        costs = CostModel(verify=CostTable.linear(0.01, 7.0, **GRID, device=device),
                          draft=CostTable.linear(0.05, 1.0, **GRID, device=device))
        cast = replace(POLICIES["cast"], cast=CastParams(efficient_depth=efficient_depth))
        return cast.budget(8, costs, 1, 100, GainBuffer.full_of_ones(8)).cast.step_base_cost

    assert step_base("NVIDIA H100 80GB HBM3", None) > 1.0  # auto on a GPU: the step's base cost is sent
    assert step_base("cpu", None) == 0.0                  # auto on a CPU: C2 alone
    assert step_base("cpu", True) > 1.0 and step_base("NVIDIA H100 80GB HBM3", False) == 0.0


def test_trees_come_back_trimmed_to_what_the_policy_may_verify():
    costs = CostModel(verify=CostTable.linear(2.0, 5.0, **GRID), draft=CostTable.linear(0.05, 1.0, **GRID))
    for name in ("cast", "eagle2", "chain"):
        policy = POLICIES[name]
        budget = policy.budget(policy.max_depth, costs, 1, 100, GainBuffer.full_of_ones(8))
        assert budget.max_returned_nodes == policy.verify_tokens > 1, name
