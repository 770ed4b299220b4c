"""Tree policies a request may name: what the draft expands and what the verifier checks.

`eagle2`: fixed depth, top-K per layer, the best `verify_tokens` nodes by value go to the verifier.
`chain`: one child per node, a fixed length, like transformers' assisted generation.
`ar`: no draft at all; each step verifies the root alone, which is plain autoregressive decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from cast_core.errors import InvalidArgument
from cast_core.tree import TokenTree


@dataclass(frozen=True)
class TreePolicy:
    name: str
    top_k: int = 0          # children per kept node; 0: no draft
    max_depth: int = 0      # layers of candidates
    max_breadth: int = 0    # nodes kept per layer
    verify_tokens: int = 1  # nodes sent to the verifier, root included

    @property
    def uses_draft(self) -> bool:
        return self.max_depth > 0

    def select(self, expanded: TokenTree) -> TokenTree:
        """The nodes to verify: the root and the best nodes by value (closed under ancestors)."""
        return expanded.top_m(self.verify_tokens)


POLICIES: dict[str, TreePolicy] = {
    "eagle2": TreePolicy("eagle2", top_k=8, max_depth=6, max_breadth=8, verify_tokens=32),
    "chain": TreePolicy("chain", top_k=1, max_depth=4, max_breadth=1, verify_tokens=5),
    "ar": TreePolicy("ar"),
}


def resolve_policy(name: str, default: str) -> TreePolicy:
    policy = POLICIES.get(name or default)
    if policy is None:
        raise InvalidArgument(f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}", "policy")
    return policy
