"""Which part of a token tree the target accepts. Pure functions: no torch, no state.

One walk serves greedy decoding and sampling ("sample, then match"): given t[i], the token the target chooses at
each node i (its argmax, or a draw from p(. | path to i), see sampling.py), start at the root; if a child of the
current node carries t[node], move to it and repeat; otherwise stop. The accepted path (root excluded) and the bonus
token t at the last node are committed: exactly what the target alone would have produced token by token.

Why sample-then-match is DESIGN's rule for deterministic (top-K) drafts. DESIGN: at a node with children
c_1..c_k, accept c_1 with probability p(c_1); else set p(c_1) = 0 and renormalise, accept c_2 with probability
p(c_2) / (1 - p(c_1)), and so on; if none is accepted, the bonus is drawn from what is left. By induction the walk
reaches c_j with probability 1 - sum_{i<j} p(c_i) and accepts it with probability p(c_j); it rejects all of
them with probability 1 - sum_i p(c_i), and then draws x (not a child) with probability p(x) / (1 - sum_i p(c_i)).
So each token x comes out of the node with probability exactly p(x), as a move to the child carrying x or as the
bonus x, and some child is accepted with probability sum_{x in children} p(x). Sample-then-match draws t ~ p once
and moves to the child carrying t or commits t as the bonus: the same law at every node, the same acceptance
probability, and recursively the same law for the whole committed path. (A token repeated among the children is
taken at its first occurrence by both rules: DESIGN has zeroed its probability when the second copy comes up.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cast_core.tree import TokenTree


@dataclass(frozen=True)
class Acceptance:
    accepted_nodes: list[int]  # tree indices of the accepted path, root excluded, root-to-leaf order
    committed_tokens: list[int]  # tokens of the accepted nodes, then the bonus token; never empty

    @property
    def bonus_token(self) -> int:
        return self.committed_tokens[-1]


def children_of(tree: TokenTree) -> list[list[int]]:
    """children[i]: the indices of node i's children, in tree order."""
    children: list[list[int]] = [[] for _ in range(len(tree))]
    for i in range(1, len(tree)):
        children[int(tree.parents[i])].append(i)
    return children


def accept_matching(tree: TokenTree, target_tokens: np.ndarray) -> Acceptance:
    """target_tokens: [N] the target's token at each node (argmax or sample): its choice for the node's next token."""
    children = children_of(tree)
    node, path = 0, []
    while True:
        want = int(target_tokens[node])
        # First child in tree order wins if a draft proposed the same token twice.
        match = next((c for c in children[node] if int(tree.tokens[c]) == want), None)
        if match is None:
            tokens = [int(tree.tokens[i]) for i in path]
            return Acceptance(accepted_nodes=path, committed_tokens=tokens + [want])
        path.append(match)
        node = match
