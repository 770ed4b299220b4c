"""Tree policies a request may name: what the draft expands and how many nodes the verifier may check.

`cast`   (default) CAST: the draft prunes breadth (C1) and depth (C2) from its cost slice inside Expand; the
         orchestrator's reranking (C3) picks how many of the expanded nodes to verify (planner.py).
`eagle2` fixed depth, top-K per layer, the best `verify_tokens` nodes by value are verified.
`chain`  one child per node, a fixed length, like transformers' assisted generation.
`ar`     no draft: each step verifies the root alone, which is plain autoregressive decoding.
`cascade` CAS-Spec's draft levels (small model, sparse target, prompt lookup) priced per step (orchestrator/cascade.py);
         `small`, `sparse`, `lookup`: one level alone, priced the same way; `cascade-fixed`: every level every step.

A policy is configuration; planner.Planner is a policy at work in a step loop, with what it learns.
"""

from __future__ import annotations

from dataclasses import dataclass

from cast_core.errors import InvalidArgument
from cast_core.selection import CastParams


@dataclass(frozen=True)
class TreePolicy:
    name: str
    top_k: int = 0            # children per kept node; 0: no draft
    max_depth: int = 0        # layers of candidates
    max_breadth: int = 0      # nodes kept per layer
    verify_tokens: int = 1    # nodes sent to the verifier at most, root included
    cast: CastParams | None = None  # set: CAST prunes within the limits above
    levels: tuple[str, ...] = ()    # set: draft levels of a cascade (orchestrator/cascade.py), in the Expand's order

    @property
    def uses_draft(self) -> bool:
        return self.max_depth > 0


def make_policies(cast: CastParams | None = None) -> dict[str, TreePolicy]:
    """The policies a request may name; `cast` with the given thresholds (defaults: cast_core.selection's)."""
    return {
        # CAST prunes within EAGLE-2's breadth and a little more depth; what it drops depends on the cost tables.
        "cast": TreePolicy("cast", top_k=8, max_depth=8, max_breadth=8, verify_tokens=48, cast=cast or CastParams()),
        "eagle2": TreePolicy("eagle2", top_k=8, max_depth=6, max_breadth=8, verify_tokens=32),
        "chain": TreePolicy("chain", top_k=1, max_depth=4, max_breadth=1, verify_tokens=5),
        "ar": TreePolicy("ar"),
        "cascade": TreePolicy("cascade", top_k=8, max_depth=8, max_breadth=8, verify_tokens=48, cast=cast or CastParams(),
                              levels=("lookup", "sparse", "small")),
        "cascade-fixed": TreePolicy("cascade-fixed", top_k=8, max_depth=6, max_breadth=8, verify_tokens=32,
                                    levels=("lookup", "sparse", "small")),
        **{level: TreePolicy(level, top_k=8, max_depth=8, max_breadth=8, verify_tokens=48, cast=cast or CastParams(),
                             levels=(level,)) for level in ("small", "sparse", "lookup")},
    }


POLICIES = make_policies()


def resolve_policy(name: str, default: str, policies: dict[str, TreePolicy] = POLICIES, field: str = "policy") -> TreePolicy:
    policy = policies.get(name or default)
    if policy is None:
        raise InvalidArgument(f"unknown policy {name!r}; choose one of {', '.join(sorted(policies))}", field)
    return policy
