"""Token trees in flat arrays, as they travel between the services.

Node 0 is the root: the last committed token. Every other node i has parents[i] < i (so a tree in this
form has no cycle) and depths[i] == depths[parents[i]] + 1. values[i] is the product of the draft's
probabilities along the path from the root (EAGLE-2's score), so a child's value never exceeds its parent's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cast_core.errors import InvalidArgument


@dataclass(frozen=True)
class TokenTree:
    tokens: np.ndarray   # [N] int64
    parents: np.ndarray  # [N] int64, -1 for the root
    depths: np.ndarray   # [N] int64
    values: np.ndarray   # [N] float32

    @staticmethod
    def root_only(token: int) -> TokenTree:
        return TokenTree(
            tokens=np.array([token], dtype=np.int64),
            parents=np.array([-1], dtype=np.int64),
            depths=np.array([0], dtype=np.int64),
            values=np.array([1.0], dtype=np.float32),
        )

    @staticmethod
    def from_lists(tokens, parents, depths, values, field: str = "tree", validate: bool = True) -> TokenTree:
        """Build a tree from plain sequences (e.g. repeated proto fields); validated unless told otherwise."""
        # np.array copies, and reads a repeated proto field directly, about 3x faster than through list().
        tree = TokenTree(
            tokens=np.array(tokens, dtype=np.int64),
            parents=np.array(parents, dtype=np.int64),
            depths=np.array(depths, dtype=np.int64),
            values=np.array(values, dtype=np.float32),
        )
        if validate:
            tree.validate(field)
        return tree

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.depths.max()) if len(self) else 0

    def validate(self, field: str = "tree", vocab_size: int | None = None) -> None:
        """Raise InvalidArgument naming the offending field unless this is a well-formed tree."""
        n = len(self)
        if n == 0:
            raise InvalidArgument("a tree needs at least its root", f"{field}.tokens")
        for name in ("parents", "depths", "values"):
            if getattr(self, name).shape[0] != n:
                raise InvalidArgument(f"has {getattr(self, name).shape[0]} entries, tokens has {n}", f"{field}.{name}")
        if self.parents[0] != -1 or self.depths[0] != 0:
            raise InvalidArgument("node 0 is the root: parent -1, depth 0", f"{field}.parents[0]")
        self.check_parent_order(field)
        bad = np.nonzero(self.depths[1:] != self.depths[self.parents[1:]] + 1)[0]
        if bad.size:
            i = int(bad[0]) + 1
            raise InvalidArgument(
                f"depth {int(self.depths[i])} of node {i} is not its parent's depth + 1", f"{field}.depths[{i}]"
            )
        if vocab_size is not None:
            bad = np.nonzero((self.tokens < 0) | (self.tokens >= vocab_size))[0]
            if bad.size:
                i = int(bad[0])
                raise InvalidArgument(
                    f"token {int(self.tokens[i])} is outside the vocabulary [0, {vocab_size})", f"{field}.tokens[{i}]"
                )


    def check_parent_order(self, field: str = "tree") -> None:
        """Every parent index precedes its child (no cycles); validate's rule, apart for the fuzz test's planted bug."""
        n = len(self)
        idx = np.arange(n)
        bad = np.nonzero((self.parents[1:] < 0) | (self.parents[1:] >= idx[1:]))[0]
        if bad.size:
            i = int(bad[0]) + 1
            raise InvalidArgument(
                f"parent {int(self.parents[i])} of node {i} is out of range: parents must precede their children "
                "(a parent index at or after its child would make a cycle)",
                f"{field}.parents[{i}]",
            )

    def ancestor_mask(self) -> np.ndarray:
        """[N, N] bool: mask[i, j] is True when j is i itself or one of its ancestors."""
        n = len(self)
        mask = np.zeros((n, n), dtype=bool)
        for i in range(n):  # parents precede children, so each row extends its parent's
            if i:
                mask[i] = mask[self.parents[i]]
            mask[i, i] = True
        return mask

    def top_m(self, m: int, keys: np.ndarray | None = None) -> TokenTree:
        """Keep the root and the m-1 other nodes of highest value, in tree order.

        Values never increase from parent to child, so the kept set is closed under ancestors whenever ties are
        broken by index (a parent precedes its child): the result is a tree. keys: [N] rank by these instead of
        the values (CAST's calibrated values, selection.calibrated_values), which must not increase either.
        """
        if m >= len(self):
            return self
        return self.subtree(self.top_m_indices(m, keys))

    def top_m_indices(self, m: int, keys: np.ndarray | None = None) -> np.ndarray:
        """The sorted indices of the nodes top_m keeps."""
        m = min(max(m, 1), len(self))
        # Stable sort by value, descending; ties keep tree order so parents win over equal-valued children.
        order = np.argsort(-(self.values if keys is None else keys)[1:], kind="stable") + 1
        return np.sort(np.concatenate([[0], order[: m - 1]]))

    def subtree(self, keep: np.ndarray) -> TokenTree:
        """The nodes `keep` (sorted, root included, closed under ancestors), re-indexed."""
        new_index = np.full(len(self), -1, dtype=np.int64)
        new_index[keep] = np.arange(keep.shape[0])
        parents = np.where(self.parents[keep] >= 0, new_index[np.maximum(self.parents[keep], 0)], -1)
        if (parents[1:] < 0).any():
            raise ValueError("subtree: the kept nodes are not closed under ancestors")
        return TokenTree(self.tokens[keep], parents, self.depths[keep], self.values[keep])


def validate_trees(trees: list[TokenTree], field: str = "tree") -> None:
    """Each tree's validate(field), checked over all of them at once (the orchestrator checks every draft tree of a
    step: one pass for the batch, where a validate per tree took a dozen numpy calls each; below 4 trees, the
    concatenations cost more than that); a bad tree raises as its own validate does."""
    sizes = [len(t) for t in trees]
    ragged = any(t.parents.shape[0] != n or t.depths.shape[0] != n or t.values.shape[0] != n
                 for t, n in zip(trees, sizes))
    if len(trees) < 4 or min(sizes) == 0 or ragged:
        for t in trees:
            t.validate(field)
        return
    starts = np.cumsum([0, *sizes[:-1]])
    parents = np.concatenate([t.parents for t in trees])
    depths = np.concatenate([t.depths for t in trees])
    local = np.arange(parents.shape[0]) - np.repeat(starts, sizes)  # each node's index in its tree
    root = local == 0
    # A root: parent -1, depth 0. Any other node: a parent before it, one level above.
    ok = np.where(root, (parents == -1) & (depths == 0),
                  (parents >= 0) & (parents < local)
                  & (depths == depths[np.clip(parents + np.repeat(starts, sizes), 0, parents.shape[0] - 1)] + 1))
    if not ok.all():
        for t in trees:
            t.validate(field)
        raise AssertionError("validate_trees found a bad tree that validate accepts")

