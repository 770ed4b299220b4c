import numpy as np

from cast_core.cost_table import CostTable
from orchestrator.costs import CostModel

GRID = dict(batch_sizes=(1, 8), context_buckets=(128, 1024), token_counts=(1, 8, 64))


def model() -> CostModel:
    return CostModel(verify=CostTable.linear(0.1, 5.0, **GRID), draft=CostTable.linear(0.05, 1.0, **GRID))


def test_step_overhead_is_learned_and_shifts_every_cell_alike():
    costs = model()
    before = costs.rerank_costs(1, 100, 64)
    for _ in range(50):  # steps of 8 nodes that really take 20 ms more than their forward
        costs.observe_verify(1, 100, 8, (costs.verify.lookup(1, 100, 8) + 20.0) / 1e3)
    assert abs(costs.verify_overhead_ms[1] - 20.0) < 0.1
    after = costs.rerank_costs(1, 100, 64)
    # The unvisited cells carry the overhead too: relative costs shrink toward 1, never jump for unvisited sizes.
    assert after[0] == 1.0 and (after <= before + 1e-9).all() and (np.diff(after) >= 0).all()
    assert costs.verify_overhead_ms.get(8, 0.0) == 0.0  # another batch size keeps its own estimate


def test_draft_overhead_makes_layers_dearer():
    costs = model()
    cheap = costs.draft_slice(1, 100).cost(0, 8)
    for _ in range(50):
        costs.observe_draft(1, 100, [(0, 3), (0, 8), (8, 8)], seconds=(3 * 4.0 + 3.0) / 1e3)
    assert costs.draft_overhead_ms[1] > 3.0
    assert costs.draft_slice(1, 100).cost(0, 8) > cheap


def test_an_expands_rpc_time_does_not_price_its_layers():
    costs = model()
    predicted = sum(costs.draft.lookup(1, 100 + nodes, n) for nodes, n in [(0, 3), (0, 8), (8, 8)])
    for _ in range(50):  # the service works 1 ms per forward beyond the table; the RPC adds 6 ms to each call
        service = predicted + 3 * 1.0
        costs.observe_draft(1, 100, [(0, 3), (0, 8), (8, 8)], seconds=(service + 6.0) / 1e3, service_seconds=service / 1e3)
    assert abs(costs.draft_overhead_ms[1] - 1.0) < 0.01
    assert abs(costs.draft_call_ms[1] - 6.0) < 0.01


def test_the_drafts_time_per_node_is_fitted_and_prices_wide_layers():
    """GPU round 4 (reports/cast-vs-fixed): the draft's forwards cost nearly the same for 4 or 64 nodes, but its
    service spends time per node; spread over the forwards, a wide layer looked free and CAST expanded ~350 nodes."""
    costs, rng = model(), np.random.default_rng(0)
    flat = costs.draft_slice(1, 100)
    for _ in range(200):  # trees of 2-8 layers of 1-32 nodes: the service works 0.3 ms a forward, 0.01 ms a node
        forwards = [(0, 2)] + [(0, int(n)) for n in rng.integers(1, 33, size=int(rng.integers(2, 9)))]
        excess = 0.3 * len(forwards) + 0.01 * sum(n for _, n in forwards) + float(rng.normal(0, 0.05))
        predicted = sum(costs.draft.lookup(1, 100 + nodes, n) for nodes, n in forwards)
        costs.observe_draft(1, 100, forwards, seconds=(predicted + excess) / 1e3)
    assert abs(costs.draft_overhead_ms[1] - 0.3) < 0.05 and abs(costs.draft_node_ms[1] - 0.01) < 0.002
    fitted, step = costs.draft_slice(1, 100), costs.verify_step_ms(1, 100, 1)
    wide_minus_narrow = (fitted.cost(0, 64) - fitted.cost(0, 1)) - (flat.cost(0, 64) - flat.cost(0, 1))
    assert abs(wide_minus_narrow - 63 * costs.draft_node_ms[1] / step) < 1e-3
    assert abs(costs.draft_forward_ms(1, 100, 10) - costs.draft.lookup(1, 100, 10) - 0.3 - 0.1) < 0.05


def test_most_efficient_cut_stops_where_tokens_per_cost_peak():
    from cast_core.selection import batch_topk_utilities
    from cast_core.selection import most_efficient_cut

    values = batch_topk_utilities([np.array([1.0, 0.9, 0.8, 0.3, 0.1, 0.05])])
    flat = np.ones(6)
    assert most_efficient_cut(values, flat, 6) == 6          # free nodes: take them all
    steep = 1.0 + 0.5 * np.arange(6)                           # each node costs half a plain step
    # u/c: 1, 1.27, 1.35, 1.2, 1.02, 0.88 -> three nodes
    assert most_efficient_cut(values, steep, 6) == 3
    assert most_efficient_cut(values, steep, 2) == 2           # never past the rule's bound


def test_a_layers_extra_nodes_pay_for_their_verification_where_the_verifier_is_steep():
    draft = CostTable.linear(0.05, 1.0, **GRID)
    flat = CostModel(verify=CostTable.linear(0.0001, 5.0, **GRID), draft=draft)  # a GPU at small batch
    steep = CostModel(verify=CostTable.linear(2.0, 5.0, **GRID), draft=draft)    # a CPU at batch 8
    for costs in (flat, steep):
        # The first node of a layer is priced by its draft forward alone, as in the paper's depth rule.
        assert np.isclose(costs.draft_slice(1, 100).cost(0, 1) * costs.verify_step_ms(1, 100, 1),
                          costs.draft.lookup(1, 100, 1))
    extra = {name: c.draft_slice(1, 100).cost(0, 8) - c.draft_slice(1, 100).cost(0, 1)
             for name, c in (("flat", flat), ("steep", steep))}
    draft_only = (draft.lookup(1, 100, 8) - draft.lookup(1, 100, 1)) / 5.0
    assert abs(extra["flat"] - draft_only) < 0.01  # hardly more than the draft's own cost
    # Seven more nodes cost seven verified tokens: 14 ms on top of a 7 ms one-token step.
    assert abs(extra["steep"] - (14.0 + draft.lookup(1, 100, 8) - draft.lookup(1, 100, 1)) / 7.0) < 0.05


def test_a_drafted_steps_base_cost_is_the_verify_step_plus_the_expand_call_and_its_commit():
    costs = model()
    one_token_step = costs.verify_step_ms(1, 100, 1)  # 5.1 ms
    commit = costs.draft_forward_ms(1, 100, 1)           # 1.05 ms
    assert abs(costs.drafted_step_base(1, 100) - (1 + commit / one_token_step)) < 1e-9
    for _ in range(50):  # every Expand call spends 6 ms in its RPC
        service = costs.draft.lookup(1, 100, 3)
        costs.observe_draft(1, 100, [(0, 3)], seconds=(service + 6.0) / 1e3, service_seconds=service / 1e3)
    assert abs(costs.drafted_step_base(1, 100) - (1 + (6.0 + commit) / one_token_step)) < 1e-3


def test_draft_slice_reused_across_steps_equals_a_fresh_computation():
    """The slice's table part is kept per set of cells; every step must still price what a cold model would."""
    rng = np.random.default_rng(0)
    grid = dict(batch_sizes=(1, 4, 8), context_buckets=(64, 128, 256, 1024), token_counts=(1, 4, 16, 64))
    shape = (3, 4, 4)

    def table() -> CostTable:  # random costs, rising along every axis
        millis = np.cumsum(np.cumsum(np.cumsum(rng.uniform(0.1, 2.0, shape), 0), 1), 2)
        return CostTable(device="gpu", model_id="m", dtype="bf16", millis=millis, **grid)

    verify, draft = table(), table()
    warm = CostModel(verify=verify, draft=draft)
    for step in range(200):
        batch, context = int(rng.choice([1, 2, 4, 8])), int(rng.integers(1, 1200))
        warm.draft_overhead_ms[batch] = float(rng.uniform(0, 1))
        warm.verify_overhead_ms[batch] = float(rng.uniform(0, 3))
        cold = CostModel(verify=verify, draft=draft, verify_overhead_ms=dict(warm.verify_overhead_ms),
                         draft_overhead_ms=dict(warm.draft_overhead_ms))
        np.testing.assert_allclose(warm.draft_slice(batch, context).normalized_cost,
                                   cold.draft_slice(batch, context).normalized_cost, rtol=1e-12)
    assert 1 < len(warm._slice_tables) < 200  # reused, and per set of cells


def test_a_hidden_draft_is_priced_at_the_share_the_step_waits_for():
    """A tree drafted while the last step was verified: its draft forwards cost their exposed share; the verifier's
    extra cost for its nodes stays whole."""
    costs = model()
    full, hidden, half = (costs.draft_slice(1, 100, share).cost(0, 8) for share in (1.0, 0.0, 0.5))
    verifier_only = costs.verify_extra_ms(1, 100, [0], [8])[0, 0] / costs.verify_step_ms(1, 100, 1)
    assert verifier_only > 0 and abs(hidden - verifier_only) < 1e-9
    assert hidden < half < full and abs(half - (full + hidden) / 2) < 1e-9
    assert costs.drafted_step_base(1, 100, 0.0) == 1.0 < costs.drafted_step_base(1, 100)
