"""Helpers shared by the verify service tests (a unique module name: every test folder has a conftest)."""

from __future__ import annotations

import numpy as np
import torch

from cast_core.tree import TokenTree
from verify_service.target import TargetModel


def greedy_reference(target: TargetModel, prompt: list[int], new_tokens: int) -> list[int]:
    """The target's own greedy continuation (generate may stop early at EOS)."""
    with torch.no_grad():
        out = target.model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def tree_with_path(
    rng: np.random.Generator, root: int, path: list[int], bonus: int, vocab_size: int, extra_nodes: int
) -> tuple[TokenTree, list[int]]:
    """A tree whose only correct branch carries `path` below `root`, with wrong siblings and wrong subtrees.

    `bonus` is the target's next token after the path: no child of the last path node may carry it, or the
    walk would go on. Returns the tree and the indices of the path nodes.
    """
    tokens, parents, depths = [root], [-1], [0]
    on_path = {0: path[0] if path else bonus}  # path node -> the token its correct child carries

    def add(token: int, parent: int) -> int:
        tokens.append(token)
        parents.append(parent)
        depths.append(depths[parent] + 1)
        return len(tokens) - 1

    def wrong_token(parent: int) -> int:
        while True:
            t = int(rng.integers(vocab_size))
            if t != on_path.get(parent, -1):
                return t

    node, path_nodes = 0, []
    for j, token in enumerate(path):
        for _ in range(int(rng.integers(0, 3))):  # wrong siblings before the correct child
            add(wrong_token(node), node)
        node = add(token, node)
        path_nodes.append(node)
        on_path[node] = path[j + 1] if j + 1 < len(path) else bonus
    for _ in range(extra_nodes):  # wrong nodes anywhere, subtrees of wrong nodes included
        parent = int(rng.integers(len(tokens)))
        add(wrong_token(parent), parent)
    n = len(tokens)
    tree = TokenTree.from_lists(tokens, parents, depths, np.linspace(1.0, 0.1, n))
    return tree, path_nodes
