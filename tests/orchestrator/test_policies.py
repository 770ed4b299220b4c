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
            policy = POLICIES[name]
            whole = [random_tree(rng, int(rng.integers(2, 400)), float(rng.uniform(0.05, 0.9))) for _ in range(batch)]
            trimmed = [t.top_m(policy.verify_tokens) for t in whole]  # what the draft returns
            value_scale = float(rng.uniform(0.5, 2.0))
            expected = policy.select(whole, costs, batch, 300, value_scale)
            got = policy.select(trimmed, costs, batch, 300, value_scale)
            for e, g in zip(expected, got, strict=True):
                assert np.array_equal(e.tokens, g.tokens) and np.array_equal(e.parents, g.parents)


def test_a_draft_from_before_trimmed_replies_still_teaches_casts_gains():
    from cast.v1 import common_pb2, draft_pb2
    from orchestrator.clients import expanded_from_proto

    tree = chain([0.8, 0.4, 0.2])
    layers = [draft_pb2.DraftLayerStats(candidates=1, kept=k) for k in (1, 1, 0)]
    wire = common_pb2.TokenTree(tokens=tree.tokens.tolist(), parents=tree.parents.tolist(),
                                depths=tree.depths.tolist(), values=tree.values.tolist())
    old = expanded_from_proto(draft_pb2.ExpandedTree(sequence_id="s", tree=wire, layers=layers))
    assert old.expanded_nodes == 4 and np.allclose(old.layer_utilities, [0.8, 0.4, 0.2])
    for layer, u in zip(layers, (0.8, 0.4, 0.2)):
        layer.kept_utility = u
    new = expanded_from_proto(draft_pb2.ExpandedTree(sequence_id="s", tree=wire, layers=layers, expanded_nodes=40))
    assert new.expanded_nodes == 40 and np.allclose(new.layer_utilities, [0.8, 0.4, 0.2])
