import numpy as np
import pytest

from cast_core.errors import InvalidArgument
from cast_core.tree import TokenTree


def sample_tree() -> TokenTree:
    #        0
    #      /   \
    #     1     2
    #    / \     \
    #   3   4     5
    return TokenTree.from_lists(
        tokens=[10, 11, 12, 13, 14, 15],
        parents=[-1, 0, 0, 1, 1, 2],
        depths=[0, 1, 1, 2, 2, 2],
        values=[1.0, 0.6, 0.3, 0.5, 0.05, 0.2],
    )


def test_ancestor_mask():
    mask = sample_tree().ancestor_mask()
    assert mask[3].tolist() == [True, True, False, True, False, False]
    assert mask[5].tolist() == [True, False, True, False, False, True]
    assert mask.diagonal().all()


def test_top_m_is_a_tree_of_the_best_values():
    tree = sample_tree()
    top = tree.top_m(4)
    assert top.tokens.tolist() == [10, 11, 12, 13]
    top.validate()
    assert tree.top_m(1).tokens.tolist() == [10]
    assert tree.top_m(100) is tree


def test_top_m_breaks_ties_toward_parents():
    tree = TokenTree.from_lists([1, 2, 3], [-1, 0, 1], [0, 1, 2], [1.0, 0.5, 0.5])
    assert tree.top_m(2).tokens.tolist() == [1, 2]


@pytest.mark.parametrize(
    "parents, depths, field",
    [
        ([-1, 0, 5], [0, 1, 2], "tree.parents[2]"),   # out of range
        ([-1, 2, 1], [0, 2, 1], "tree.parents[1]"),   # refers forward: a cycle 1 -> 2 -> 1
        ([-1, 0, 0], [0, 1, 2], "tree.depths[2]"),    # depth mismatch
        ([0, 0, 0], [0, 1, 1], "tree.parents[0]"),    # root with a parent
    ],
)
def test_malformed_trees_name_the_field(parents, depths, field):
    with pytest.raises(InvalidArgument) as info:
        TokenTree.from_lists([1, 2, 3], parents, depths, [1, 1, 1])
    assert info.value.field == field


def test_tokens_outside_the_vocabulary():
    tree = TokenTree.from_lists([1, 2, 99], [-1, 0, 1], [0, 1, 2], [1, 1, 1])
    with pytest.raises(InvalidArgument, match=r"tokens\[2\]"):
        tree.validate(vocab_size=50)


def test_calibrated_values_scale_each_depth_and_never_pass_a_parent():
    """Scales rising with depth lift deep nodes above shallow siblings, but a child never outranks its parent: the
    best m by calibrated value are still a tree."""
    from cast_core.selection import calibrated_values

    # root; 1: 0.6, 2: 0.48 (siblings); 3: 0.5 under 1 (p = 0.83); 4: 0.45 under 3 (p = 0.9)
    tree = TokenTree.from_lists([0, 1, 2, 3, 4], [-1, 0, 0, 1, 3], [0, 1, 1, 2, 3], [1.0, 0.6, 0.48, 0.5, 0.45])
    keys = calibrated_values(tree, [1.0, 2.0, 4.0])
    assert np.allclose(keys, [1.0, 0.6, 0.48, 0.6, 0.6])  # 2.0 * 0.5 and 4.0 * 0.45 capped at their parent's 0.6
    assert tree.top_m(4, keys).tokens.tolist() == [0, 1, 3, 4]  # the deep chain, not the sibling 2
    assert tree.top_m(4).tokens.tolist() == [0, 1, 2, 3]       # by the draft's values: the sibling
    assert np.allclose(calibrated_values(tree, []), tree.values)  # no scales: the values themselves
    assert np.allclose(calibrated_values(tree, [2.0]), [1.0, 1.0, 0.96, 1.0, 0.9])  # the last scale for deeper


def tree_shapes(max_nodes: int):
    """Hypothesis: (n, parents, depths) of a random tree of 1..max_nodes nodes, parents before children."""
    from hypothesis import strategies as st

    @st.composite
    def shapes(draw):
        n = draw(st.integers(1, max_nodes))
        parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
        depths = [0]
        for p in parents[1:]:
            depths.append(depths[p] + 1)
        return n, parents, depths

    return shapes()


def test_calibrated_values_of_a_batch_are_each_trees_own_layer_by_layer():
    """The batch's calibrated values (one pass over all trees) are, bit for bit, each tree's min(parent's key,
    scale x value) taken layer by layer from the root, whatever the trees' node order (parents first), depth or
    scales: the draft computes them that way and both sides must rank nodes alike."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from cast_core.selection import batch_calibrated_values

    def layer_by_layer(tree: TokenTree, scales) -> np.ndarray:
        keys = tree.values.astype(np.float64)
        keys[0] = 1.0
        for i in range(1, len(tree)):  # parents precede children
            d = int(tree.depths[i])
            scale = float(scales[min(d, len(scales)) - 1]) if scales else 1.0
            keys[i] = min(keys[tree.parents[i]], scale * float(tree.values[i]))
        return keys

    @st.composite
    def trees(draw):
        n, parents, depths = draw(tree_shapes(40))
        values = [1.0]
        for p in parents[1:]:  # a child is worth at most its parent
            values.append(values[p] * draw(st.sampled_from([1.0, 0.5, 0.9, 0.3, 0.01])))
        return TokenTree.from_lists(list(range(n)), parents, depths, values)

    @settings(max_examples=200, deadline=None)
    @given(batch=st.lists(trees(), min_size=1, max_size=6),
           scales=st.lists(st.floats(0.25, 16.0, width=32), max_size=8))
    def check(batch, scales):
        got = batch_calibrated_values(batch, scales)
        assert [g.tolist() for g in got] == [layer_by_layer(t, scales).tolist() for t in batch]

    check()


def test_a_batch_of_trees_is_checked_as_each_tree_alone():
    """validate_trees accepts what each tree's validate accepts and, for a batch with a bad tree (a parent at or
    after its child, a wrong depth, a bad root, a missing entry), raises what the first bad tree's validate raises."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from cast_core.tree import validate_trees

    @st.composite
    def trees(draw):
        n, parents, depths = draw(tree_shapes(12))
        if draw(st.integers(0, 3)) == 0:  # break it
            what, i = draw(st.sampled_from(["parent", "depth", "root", "short"])), draw(st.integers(0, n - 1))
            if what == "parent":
                parents[i] = draw(st.integers(-2, n + 2))
            elif what == "depth":
                depths[i] += draw(st.sampled_from([-1, 1, 2]))
            elif what == "root":
                parents[0] = 0
            else:
                depths = depths[:-1]
        return TokenTree(np.arange(n), np.array(parents), np.array(depths), np.ones(n, dtype=np.float32))

    def outcome(check):
        try:
            check()
        except InvalidArgument as e:
            return (e.field, str(e))
        return None

    @settings(max_examples=300, deadline=None)
    @given(batch=st.lists(trees(), min_size=1, max_size=8))
    def check(batch):
        alone = next((o for o in (outcome(lambda t=t: t.validate("draft tree")) for t in batch) if o), None)
        assert outcome(lambda: validate_trees(batch, "draft tree")) == alone

    check()
