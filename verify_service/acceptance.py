"""Which part of a token tree the target accepts. Pure functions: no torch, no state.

Greedy: start at the root; t = the target's argmax at the current node; if a child of the node carries t, move to it
and repeat; otherwise stop. The accepted path (root excluded) and the bonus token t at the last node are committed,
which is exactly what the target alone would have produced token by token.
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


def accept_greedy(tree: TokenTree, target_argmax: np.ndarray) -> Acceptance:
    """target_argmax: [N] the target's argmax token at each node (its prediction for the node's next token)."""
    children = children_of(tree)
    node, path = 0, []
    while True:
        want = int(target_argmax[node])
        # First child in tree order wins if a draft proposed the same token twice.
        match = next((c for c in children[node] if int(tree.tokens[c]) == want), None)
        if match is None:
            tokens = [int(tree.tokens[i]) for i in path]
            return Acceptance(accepted_nodes=path, committed_tokens=tokens + [want])
        path.append(match)
        node = match
