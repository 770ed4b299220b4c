"""The acceptance walk as a pure function (greedy: the target's token at each node is its argmax)."""

from __future__ import annotations

import numpy as np

from cast_core.tree import TokenTree
from verify_service.acceptance import accept_matching


def tree(tokens, parents):
    depths = [0] * len(tokens)
    for i in range(1, len(tokens)):
        depths[i] = depths[parents[i]] + 1
    return TokenTree.from_lists(tokens, parents, depths, [1.0] * len(tokens))


def test_root_only_commits_the_bonus_token():
    a = accept_matching(TokenTree.root_only(7), np.array([3]))
    assert a.accepted_nodes == [] and a.committed_tokens == [3] and a.bonus_token == 3


def test_walks_the_matching_branch_past_wrong_siblings():
    #        0:10
    #     /    |    \
    #  1:11  2:12  3:13
    #          |      |
    #        4:20   5:21
    #          |
    #        6:30
    t = tree([10, 11, 12, 13, 20, 21, 30], [-1, 0, 0, 0, 2, 3, 4])
    argmax = np.array([12, 0, 20, 0, 30, 0, 99])
    a = accept_matching(t, argmax)
    assert a.accepted_nodes == [2, 4, 6]
    assert a.committed_tokens == [12, 20, 30, 99]


def test_stops_where_no_child_matches():
    t = tree([10, 11, 12, 20], [-1, 0, 0, 1])
    a = accept_matching(t, np.array([11, 21, 0, 0]))
    assert a.accepted_nodes == [1] and a.committed_tokens == [11, 21]


def test_no_match_at_the_root():
    t = tree([10, 11, 12], [-1, 0, 0])
    a = accept_matching(t, np.array([13, 0, 0]))
    assert a.accepted_nodes == [] and a.committed_tokens == [13]


def test_duplicate_children_take_the_first_in_tree_order():
    t = tree([10, 11, 11, 5], [-1, 0, 0, 2])
    a = accept_matching(t, np.array([11, 7, 5, 0]))
    assert a.accepted_nodes == [1] and a.committed_tokens == [11, 7]
