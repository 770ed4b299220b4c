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
    scales, with or without sibling scales (a child that is not its parent's first of highest value takes its
    depth's sibling scale, capped by the top-1 one): the draft computes them that way and both sides must rank
    nodes alike."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from cast_core.selection import batch_calibrated_values

    def layer_by_layer(tree: TokenTree, scales, siblings) -> np.ndarray:
        keys = tree.values.astype(np.float64)
        keys[0] = 1.0
        for i in range(1, len(tree)):  # parents precede children
            d = int(tree.depths[i])
            scale = float(scales[min(d, len(scales)) - 1]) if scales else 1.0
            brothers = [j for j in range(1, len(tree)) if tree.parents[j] == tree.parents[i]]
            top = max(brothers, key=lambda j: (tree.values[j], -j))  # the first of the highest
            if siblings and i != top:
                scale = min(float(siblings[min(d, len(siblings)) - 1]), scale)
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
           scales=st.lists(st.floats(0.25, 16.0, width=32), max_size=8),
           siblings=st.lists(st.floats(0.125, 16.0, width=32), max_size=8))
    def check(batch, scales, siblings):
        if siblings and not scales:  # the draft refuses sibling scales without top-1 ones
            scales = [1.0]
        got = batch_calibrated_values(batch, scales, siblings)
        assert [g.tolist() for g in got] == [layer_by_layer(t, scales, siblings).tolist() for t in batch]

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


def test_siblings_take_their_own_scale_capped_by_the_top_1_one_and_trimming_keeps_every_key():
    """With sibling_scales a node that is not its parent's top child (highest value, first among equals) is weighed
    by them, never above its depth's top-1 scale; calibrated values never rise along a path; a tree trimmed to its
    best m by calibrated value gives its kept nodes the keys they had (what the draft and the orchestrator rank
    by: each computes them on its own tree); no sibling_scales is the per-depth calibration as before."""
    from cast_core.selection import calibrated_values, top_children

    # root; 1: 0.3 and 2: 0.6 (2 is the top child, after its sibling); 3: 0.2 and 4: 0.2 under 2 (3 first: top)
    tree = TokenTree.from_lists([0, 1, 2, 3, 4], [-1, 0, 0, 2, 2], [0, 1, 1, 2, 2], [1.0, 0.3, 0.6, 0.2, 0.2])
    assert top_children(tree).tolist() == [False, False, True, True, False]
    keys = calibrated_values(tree, [1.5, 2.0], [0.5, 4.0])  # 4.0 at depth 2 is capped at that depth's 2.0
    assert np.allclose(keys, [1.0, 0.15, 0.9, 0.4, 0.4])
    assert np.array_equal(calibrated_values(tree, [1.5, 2.0], []), calibrated_values(tree, [1.5, 2.0]))
    assert np.allclose(calibrated_values(tree, [1.5, 2.0], [0.25]), [1.0, 0.075, 0.9, 0.4, 0.05])

    rng = np.random.default_rng(3)
    for trial in range(200):
        n = int(rng.integers(2, 120))
        parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
        depths = [0] * n
        values = [1.0] * n
        for i in range(1, n):
            depths[i] = depths[parents[i]] + 1
            values[i] = values[parents[i]] * float(rng.choice([rng.uniform(0, 1), 0.5]))  # ties too
        t = TokenTree.from_lists(range(n), parents, depths, values)
        scales = rng.uniform(0.5, 3.0, 6).astype(np.float32).tolist()
        siblings = rng.uniform(0.2, 4.0, int(rng.integers(1, 7))).astype(np.float32).tolist()
        keys = calibrated_values(t, scales, siblings)
        assert (keys[1:] <= keys[t.parents[1:]]).all()  # monotone along every path
        top = top_children(t)
        for p in set(parents[1:]):  # the top child outranks (or ties and precedes) each sibling
            kids = np.nonzero(t.parents == p)[0]
            first = kids[top[kids]]
            assert first.size == 1 and (keys[kids] <= keys[first[0]]).all()
        m = int(rng.integers(1, n + 1))
        kept = t.top_m_indices(m, keys)
        assert np.array_equal(calibrated_values(t.subtree(kept), scales, siblings), keys[kept]), trial
