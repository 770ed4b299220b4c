"""Tree expansion with the target drafting for itself: greedy path, tree invariants, layer sizes, KV consistency."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from cast_core.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, ResourceExhausted
from draft_service.expansion import Budget, SequenceInput, max_tree_nodes

PROMPT = [5, 17, 99, 3, 200, 42, 7, 310, 64]


def seq(sid: str, tokens, start: int = 0) -> SequenceInput:
    return SequenceInput(sid, np.asarray(tokens, dtype=np.int64), start)


@pytest.fixture(scope="module")
def greedy(draft_model_dir):
    """greedy(prompt, n) -> the HF model's own greedy continuation."""
    model = AutoModelForCausalLM.from_pretrained(draft_model_dir).eval()

    def run(prompt: list[int], n: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
        return out[0, len(prompt):].tolist()

    return run


def best_path(tree) -> list[int]:
    """From the root, follow the child of highest value down to a leaf: the tokens on the way."""
    node, path = 0, []
    while (children := np.nonzero(tree.parents == node)[0]).size:
        node = int(children[np.argmax(tree.values[children])])
        path.append(int(tree.tokens[node]))
    return path


def check_invariants(tree, layers, budget: Budget) -> None:
    tree.validate()  # parents precede children, depths consistent
    assert tree.parents[0] == -1 and tree.values[0] == 1.0
    assert (tree.values[1:] <= tree.values[tree.parents[1:]]).all(), "a child's value never exceeds its parent's"
    assert len(layers) <= budget.max_depth
    assert sum(s.candidates for s in layers) == len(tree) - 1
    for d, s in enumerate(layers, start=1):
        assert (tree.depths == d).sum() == s.candidates
        assert s.kept <= budget.max_breadth and s.kept <= s.candidates
        expected = budget.top_k if d == 1 else layers[d - 2].kept * budget.top_k
        assert s.candidates == expected
        # Each kept node proposes exactly top_k distinct children.
        for parent in np.unique(tree.parents[tree.depths == d]):
            children = tree.tokens[tree.parents == parent]
            assert children.size == budget.top_k and np.unique(children).size == budget.top_k
    assert layers[-1].kept == 0 if layers else True


def test_full_tree_holds_the_greedy_continuation_as_its_best_path(make_expander, greedy):
    ex = make_expander()
    budget = Budget(top_k=2, max_depth=4, max_breadth=8)  # 2, 4, 8, 16: nothing pruned
    [e], seconds = ex.expand([seq("a", PROMPT)], budget)
    assert seconds > 0
    assert [s.candidates for s in e.layers] == [2, 4, 8, 16]
    assert [s.kept for s in e.layers] == [2, 4, 8, 0]
    check_invariants(e.tree, e.layers, budget)
    assert int(e.tree.tokens[0]) == PROMPT[-1]
    assert best_path(e.tree) == greedy(PROMPT, 4)


def test_a_trimmed_tree_is_the_full_trees_best_nodes(make_expander):
    from dataclasses import replace

    from cast_core.cost_table import NormalizedCostSlice
    from cast_core.selection import kept_layer_utilities
    from draft_service.expansion import CastBudget

    free = NormalizedCostSlice((1, 64), (1, 64), np.full((2, 2), 1e-6))
    cast = CastBudget(free, 0.0, 0.0, 1.0)  # CAST that prunes nothing: the same tree as EAGLE-2's limits give
    budget = Budget(top_k=4, max_depth=4, max_breadth=3, cast=cast)  # 4 + 12 + 12 + 12 nodes: 41 with the root
    [full], _ = make_expander().expand([seq("a", PROMPT)], budget)
    [trimmed], _ = make_expander().expand([seq("a", PROMPT)], replace(budget, max_returned_nodes=10))
    # CAST grows no node that the trimming would drop (nor its descendants): fewer nodes, the same best 10.
    assert full.expanded_nodes == len(full.tree) == 41 and trimmed.expanded_nodes < 41
    assert len(trimmed.tree) == 10
    trimmed.tree.validate()  # the best nodes by value are a tree: closed under ancestors
    best = full.tree.top_m(10)
    for field in ("tokens", "parents", "depths", "values"):
        assert np.array_equal(getattr(trimmed.tree, field), getattr(best, field)), field
    assert full.layer_utilities == pytest.approx(kept_layer_utilities(full.tree, [3, 3, 3, 0]), rel=1e-6)
    # The caller's selection of m <= 10 nodes is the same on either tree.
    for m in (1, 4, 10):
        assert np.array_equal(trimmed.tree.top_m(m).tokens, full.tree.top_m(m).tokens)
    # Only CAST learns from the utilities: without it they are not computed.
    [plain], _ = make_expander().expand([seq("a", PROMPT)], replace(budget, cast=None, max_returned_nodes=10))
    assert plain.layer_utilities == [0.0] * 4 and plain.expanded_nodes == 41


@pytest.mark.parametrize("top_k,max_depth,max_breadth", [(4, 5, 3), (8, 3, 1), (1, 6, 1), (3, 1, 2), (5, 0, 4)])
def test_layer_sizes_obey_the_budget(make_expander, greedy, top_k, max_depth, max_breadth):
    ex = make_expander()
    budget = Budget(top_k=top_k, max_depth=max_depth, max_breadth=max_breadth)
    [e], _ = ex.expand([seq("a", PROMPT)], budget)
    check_invariants(e.tree, e.layers, budget)
    assert len(e.layers) == max_depth
    if max_depth == 0:
        assert len(e.tree) == 1
    if top_k == 1:  # a chain: exactly the greedy continuation
        assert e.tree.tokens[1:].tolist() == greedy(PROMPT, max_depth)


def test_tree_kv_is_dropped_and_committed_kv_kept(make_expander):
    ex = make_expander()
    ex.expand([seq("a", PROMPT)], Budget(4, 3, 4))
    assert ex.sessions.get("a").length == len(PROMPT)
    ex.expand([seq("a", [11, 12], len(PROMPT))], Budget(4, 3, 4))
    assert ex.sessions.get("a").length == len(PROMPT) + 2


def assert_same_tree(a, b) -> None:
    np.testing.assert_array_equal(a.tree.tokens, b.tree.tokens)
    np.testing.assert_array_equal(a.tree.parents, b.tree.parents)
    np.testing.assert_allclose(a.tree.values, b.tree.values, rtol=1e-4, atol=1e-6)
    assert a.layers == b.layers


def test_incremental_calls_equal_a_fresh_session(make_expander, greedy):
    """Committing tokens step by step (in a batch with another sequence) leaves the same KV as one prefill."""
    budget = Budget(top_k=3, max_depth=3, max_breadth=3)
    ex = make_expander()
    full = PROMPT + greedy(PROMPT, 6)
    ex.expand([seq("inc", PROMPT[:4]), seq("other", [9, 8, 7, 6, 5, 4, 3])], budget)
    pos = 4
    for i, step in enumerate((1, 3, 1, 4, 2)):  # mixed lengths, like accepted runs of different size
        chunk = full[pos: pos + step]
        trees, _ = ex.expand([seq("other", [1], 7 + i), seq("inc", chunk, pos)], budget)
        pos += step
        [fresh], _ = make_expander().expand([seq("new", full[:pos])], budget)
        assert_same_tree(trees[1], fresh)


def test_batch_equals_one_at_a_time(make_expander):
    budget = Budget(top_k=4, max_depth=3, max_breadth=2)
    prompts = {"a": PROMPT, "b": [1, 2], "c": [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311]}
    batch, _ = make_expander().expand([seq(s, p) for s, p in prompts.items()], budget)
    for e, (sid, p) in zip(batch, prompts.items()):
        [alone], _ = make_expander().expand([seq(sid, p)], budget)
        assert e.sequence_id == sid
        assert_same_tree(e, alone)


def test_requests_expanded_together_get_the_trees_of_their_own_budgets(make_expander):
    """Orchestrators sharing a draft replica: their Expands run as one expansion, and each request's trees are what
    its own budget gives alone (CAST's breadth and depth decisions included: they are taken per request)."""
    from cast_core.cost_table import NormalizedCostSlice
    from draft_service.expansion import CastBudget

    prices = NormalizedCostSlice((1, 16, 64), (1, 2, 4, 8, 64), np.array([[0.001, 0.0015, 0.003, 0.006, 0.05]] * 3))
    cast = Budget(top_k=4, max_depth=5, max_breadth=4, cast=CastBudget(prices, 10.0, 3.0, 0.8))
    requests = [
        ([seq("a", PROMPT), seq("b", [1, 2])], cast),
        ([], Budget(2, 2, 2)),
        ([seq("c", [300, 301, 302, 303])], Budget(top_k=2, max_depth=4, max_breadth=3, max_returned_nodes=9)),
        ([seq("d", [7, 8, 9])], Budget(top_k=8, max_depth=1, max_breadth=1)),
    ]
    together, seconds = make_expander().expand_together(requests)
    assert seconds > 0 and [len(out) for out in together] == [2, 0, 1, 1]
    for (sequences, budget), out in zip(requests, together):
        alone, _ = make_expander().expand(sequences, budget)
        assert [e.sequence_id for e in out] == [q.sequence_id for q in sequences]
        for e, a in zip(out, alone):
            assert_same_tree(e, a)
            assert e.expanded_nodes == a.expanded_nodes
            assert e.layer_utilities == pytest.approx(a.layer_utilities, rel=1e-4)
    assert 0 < together[0][0].layers[1].kept < cast.max_breadth  # CAST pruned this breadth
    assert len(together[2][0].tree) == 9 and [len(e.layers) for e in together[3]] == [1]


def test_tree_is_clipped_at_the_context_end(make_expander):
    ex = make_expander(max_context=len(PROMPT) + 2)
    [e], _ = ex.expand([seq("a", PROMPT)], Budget(2, 5, 2))
    assert e.tree.max_depth == 2 and len(e.layers) == 2  # root at position len-1: room for two more


@pytest.mark.parametrize(
    "budget,sequences,error,field",
    [
        (Budget(0, 3, 2), [seq("a", PROMPT)], InvalidArgument, "budget.top_k"),
        (Budget(9, 3, 2), [seq("a", PROMPT)], InvalidArgument, "budget.top_k"),
        (Budget(2, -1, 2), [seq("a", PROMPT)], InvalidArgument, "budget.max_depth"),
        (Budget(2, 3, 0), [seq("a", PROMPT)], InvalidArgument, "budget.max_breadth"),
        (Budget(2, 3, 2, max_returned_nodes=-1), [seq("a", PROMPT)], InvalidArgument, "budget.max_returned_nodes"),
        (Budget(2, 3, 2), [seq("a", PROMPT), seq("", [1])], InvalidArgument, "sequences[1].sequence_id"),
        (Budget(2, 3, 2), [seq("a", PROMPT), seq("a", [1])], InvalidArgument, "sequences[1].sequence_id"),
        (Budget(2, 3, 2), [seq("a", [])], InvalidArgument, "sequences[0].new_tokens"),
        (Budget(2, 3, 2), [seq("a", [1, 2, 512])], InvalidArgument, "sequences[0].new_tokens[2]"),
        (Budget(2, 3, 2), [seq("a", [1, -1])], InvalidArgument, "sequences[0].new_tokens[1]"),
        (Budget(2, 3, 2), [seq("a", [1], -2)], InvalidArgument, "sequences[0].start_position"),
        (Budget(2, 3, 2), [seq("b", [1]), seq("a", [1], 5)], NotFound, "sequences[1].sequence_id"),
        (Budget(2, 3, 2), [seq("a", [1] * 1025)], OutOfRange, "sequences[0].new_tokens"),
        (Budget(8, 10, 64), [seq("a", PROMPT)], OutOfRange, "budget"),
        (Budget(1, 65, 1), [seq("a", PROMPT)], OutOfRange, "budget.max_depth"),
    ],
)
def test_bad_requests_name_the_field_and_change_nothing(make_expander, budget, sequences, error, field):
    ex = make_expander()
    with pytest.raises(error) as info:
        ex.expand(sequences, budget)
    assert info.value.field == field and str(info.value).startswith(field)
    assert len(ex.sessions) == 0, "a rejected request creates no session"


def test_a_start_past_the_cache_is_a_failed_precondition(make_expander):
    ex = make_expander()
    ex.expand([seq("a", PROMPT)], Budget(2, 2, 2))
    for start in (len(PROMPT) + 1, len(PROMPT) + 5):
        with pytest.raises(FailedPrecondition) as info:
            ex.expand([seq("b", [1]), seq("a", [1], start)], Budget(2, 2, 2))
        assert info.value.field == "sequences[1].start_position"
    assert "b" not in ex.sessions and ex.sessions.get("a").length == len(PROMPT)


def test_an_earlier_start_rewinds_the_cache(make_expander):
    """A branch committed on a guess (a prepared Expand the verifier did not take) is forgotten from the start
    position on: the tree is the one a fresh session with the real tokens gets."""
    budget = Budget(top_k=3, max_depth=3, max_breadth=3)
    ex = make_expander()
    ex.expand([seq("a", PROMPT), seq("other", [9, 8, 7])], budget)
    ex.expand([seq("a", [11, 12, 13], len(PROMPT)), seq("other", [6], 3)], budget)  # the guess
    real = [11, 40, 41]
    trees, _ = ex.expand([seq("other", [5], 4), seq("a", real[1:], len(PROMPT) + 1)], budget)
    assert ex.sessions.get("a").tokens == PROMPT + real
    [fresh], _ = make_expander().expand([seq("new", PROMPT + real)], budget)
    assert_same_tree(trees[1], fresh)
    for start in (0, 3):  # back into the prompt, and to the very start
        [again], _ = ex.expand([seq("a", (PROMPT + real)[start:], start)], budget)
        assert_same_tree(again, fresh)


def test_a_predicted_root_is_the_drafts_top_choice_committed(make_expander, greedy):
    """predict_root: the draft commits the new tokens and its own most likely next token, and roots the tree there:
    the same tree as an ordinary Expand that sent that token; sequences without it in the batch are unchanged."""
    budget = Budget(top_k=3, max_depth=3, max_breadth=3)
    ex = make_expander()
    ex.expand([seq("a", PROMPT), seq("b", [9, 8, 7])], budget)
    path = greedy(PROMPT, 3)
    trees, _ = ex.expand([SequenceInput("a", np.asarray(path[:2]), len(PROMPT), predict_root=True),
                          seq("b", [6, 5], 3)], budget)
    assert int(trees[0].tree.tokens[0]) == path[2]
    assert ex.sessions.get("a").tokens == PROMPT + path and ex.sessions.get("b").tokens == [9, 8, 7, 6, 5]
    fresh = make_expander()
    [a, b], _ = fresh.expand([seq("a", PROMPT + path), seq("b", [9, 8, 7, 6, 5])], budget)
    assert_same_tree(trees[0], a)
    assert_same_tree(trees[1], b)


def test_no_room_for_new_sessions_is_resource_exhausted(make_expander):
    ex = make_expander(max_sessions=2)
    ex.expand([seq("a", [1])], Budget(2, 1, 2))
    with pytest.raises(ResourceExhausted) as info:
        ex.expand([seq("a", [2], 1), seq("b", [1]), seq("c", [1])], Budget(2, 1, 2))
    assert info.value.field == "sequences[2].sequence_id"
    assert ex.release(["a", "zzz"]) == 1
    ex.expand([seq("b", [1]), seq("c", [1])], Budget(2, 1, 2))


def test_max_tree_nodes_bounds_every_tree(make_expander):
    assert max_tree_nodes(Budget(2, 4, 8)) == 1 + 2 + 4 + 8 + 16
    assert max_tree_nodes(Budget(8, 3, 2)) == 1 + 8 + 16 + 16
    assert max_tree_nodes(Budget(8, 0, 2)) == 1
    for budget in (Budget(3, 4, 2), Budget(1, 5, 1), Budget(8, 2, 8)):
        [e], _ = make_expander().expand([seq("a", PROMPT)], budget)
        assert len(e.tree) == max_tree_nodes(budget)  # EAGLE-2 never prunes below the limits


@pytest.mark.parametrize("price,c1", [(1e-7, 0.5), (0.001, 5.0), (0.01, 2.0)])  # layers kept: 3s; 3, 3, 1; 3, 1, 1
def test_layer_utilities_are_each_trees_kept_sums_in_a_ragged_batch(make_expander, price, c1):
    """u^(i) per sequence, as the orchestrator would compute it from the whole tree (kept_layer_utilities), also
    where sequences stop at different depths (one near the context's end) and CAST's breadth rule prunes."""
    from cast_core.cost_table import NormalizedCostSlice
    from cast_core.selection import kept_layer_utilities
    from draft_service.expansion import CastBudget

    row = [price, 2 * price, 3 * price, 4 * price]  # forwarding k nodes costs k x price
    cost = NormalizedCostSlice((1, 64), (1, 2, 3, 4), np.array([row, row]))
    budget = Budget(top_k=4, max_depth=5, max_breadth=3, cast=CastBudget(cost, c1, 0.01, 0.8))
    ex = make_expander(max_context=len(PROMPT) + 1)  # room for 2 layers after "c", 4 after "b"
    out, _ = ex.expand([seq("a", PROMPT[:4]), seq("b", PROMPT[:6]), seq("c", PROMPT[:-1])], budget)
    assert len({len(e.layers) for e in out}) > 1, "the sequences should stop at different depths"
    for e in out:
        kept = [s.kept for s in e.layers]
        assert e.layer_utilities == pytest.approx(kept_layer_utilities(e.tree, kept), rel=1e-6)
