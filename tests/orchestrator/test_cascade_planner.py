"""The cascade planner without services: what it learns per level and tree depth, and which level it drafts with."""

from __future__ import annotations

from cast_core.cost_table import CostTable
from cast_core.tree import TokenTree
from orchestrator.cascade import PRIOR_RATE, CascadePlanner, LevelAcceptance
from orchestrator.costs import CostModel
from orchestrator.policies import POLICIES


def test_acceptance_is_learned_per_level_and_depth():
    # root -> 7 (lookup) -> 8 (lookup); root -> 3 (sparse) -> 4 (sparse)
    tree = TokenTree.from_lists([5, 7, 8, 3, 4], [-1, 0, 1, 0, 3], [0, 1, 2, 1, 2], [1, .9, .8, .5, .4])
    levels = [None, "lookup", "lookup", "sparse", "sparse"]
    a = LevelAcceptance()
    for _ in range(40):
        a.count_step({"lookup", "sparse"})
        a.observe(tree, levels, [7, 8, 1])  # lookup's chain accepted whole, then a bonus token
    lookup, sparse = a.rates("lookup", 3), a.rates("sparse", 3)
    assert lookup[0] > 0.9 and lookup[1] > 0.9
    assert lookup[2] == PRIOR_RATE  # nothing proposed at depth 3: the prior
    assert sparse[0] < 0.1  # offered at depth 1 every step, never accepted
    assert sparse[1] == PRIOR_RATE  # never offered at depth 2 (its parent was never accepted)
    assert a.expected_tokens("lookup", 2) > 1.7 > a.expected_tokens("sparse", 2)


def table(lam: float, delta: float, model: str) -> CostTable:
    return CostTable.linear(lam, delta, batch_sizes=(1, 8), context_buckets=(128, 2048),
                            token_counts=(1, 8, 64), device="cpu", model_id=model, dtype="float32")


def costs_with_levels(small_ms: float, sparse_ms: float) -> CostModel:
    verify = table(0.05, 10.0, "target")
    costs = CostModel.from_tables(verify, table(0.01, small_ms, "small"))
    costs.levels = {"small": CostModel.from_tables(verify, table(0.01, small_ms, "small")),
                    "sparse": CostModel.from_tables(verify, table(0.01, sparse_ms, "sparse")),
                    "lookup": CostModel.from_tables(verify, table(0.0, 0.01, "lookup"))}
    return costs


def test_the_level_with_more_tokens_per_millisecond_drafts_lookup_always_joins():
    planner = CascadePlanner(POLICIES["cascade"])
    costs = costs_with_levels(small_ms=1.0, sparse_ms=5.0)
    budget = planner.budget(costs, 1, 100)
    assert [level.level for level in budget.levels] == ["lookup", "small"]  # equal priors: the cheaper level
    assert budget.levels[1].budget.HasField("cast") and budget.levels[0].acceptance
    # Sparse's chains of 8 are accepted whole, small's first token never: sparse wins despite its cost.
    chain = TokenTree.from_lists(list(range(9)), list(range(-1, 8)), list(range(9)), [1.0] * 9)
    choices = []
    for _ in range(64):
        chosen = [level.level for level in planner.budget(costs, 1, 100).levels][-1]
        choices.append(chosen)
        levels = [None] + [chosen] * 8
        planner.acceptance.observe(chain, levels, list(range(1, 10)) if chosen == "sparse" else [99])
    assert choices[-32:].count("sparse") >= 30 and "small" in choices[-32:]  # one step in 16 tries the other


def test_a_level_alone_and_a_replica_without_it():
    costs = costs_with_levels(1.0, 5.0)
    lookup = CascadePlanner(POLICIES["lookup"])
    assert [level.level for level in lookup.budget(costs, 1, 100).levels] == ["lookup"]
    del costs.levels["sparse"]
    sparse = CascadePlanner(POLICIES["sparse"])
    assert not sparse.drafts(costs, 1, 100)  # not served: plain steps, not an error
    fixed = CascadePlanner(POLICIES["cascade-fixed"])
    assert [level.level for level in fixed.budget(costs, 8, 100).levels] == ["lookup", "small"]
    assert not fixed.budget(costs, 8, 100).levels[1].budget.HasField("cast")


def test_a_step_loops_cascade_planners_outlive_fixed_shapes():
    """The step loop's Planners builds a cascade's planner (the fixed cascade's too, which learns each level's
    acceptance) and keeps it however many fixed shapes requests name."""
    from orchestrator.cascade import make_planner
    from orchestrator.planner import Planners
    from orchestrator.policies import resolve_policy

    planners = Planners(make_planner, max_fixed=2)
    kept = {name: planners.get(POLICIES[name]) for name in ("cascade", "cascade-fixed", "lookup")}
    assert all(isinstance(p, CascadePlanner) for p in kept.values())
    kept["cascade-fixed"].acceptance.count_step({"lookup"})  # learned
    for depth in range(1, 9):
        planners.get(resolve_policy(f"chain:{depth}", "cast"))
    assert all(planners.get(POLICIES[name]) is p for name, p in kept.items())
    assert kept["cascade-fixed"].acceptance.tries("lookup") == 1
    assert type(planners.get(POLICIES["cast"])) is not CascadePlanner
