"""Tree policies a request may name: what the draft expands and how many nodes the verifier may check.

`cast`   (default) CAST: the draft prunes breadth (C1) and depth (C2) from its cost slice inside Expand; the
         orchestrator's reranking (C3) picks how many of the expanded nodes to verify (planner.py).
`eagle2` fixed depth, top-K per layer, the best `verify_tokens` nodes by value are verified.
`chain`  one child per node, a fixed length, like transformers' assisted generation.
`ar`     no draft: each step verifies the root alone, which is plain autoregressive decoding.
`cascade` CAS-Spec's draft levels (small model, sparse target, prompt lookup) priced per step (orchestrator/cascade.py);
         `small`, `sparse`, `lookup`: one level alone, priced the same way; `cascade-fixed`: every level every step.

Fixed shapes by parameter, for tuning and for judging CAST against the best fixed tree of a setting (`cast sweep`):
`chain:D`      one child per node, D layers (D + 1 nodes verified, the root included);
`tree:KxD/N`   EAGLE-2's shape: each layer keeps its best K nodes, each proposes its top K children, D layers;
               the best N nodes by value are verified (at most as many as the tree holds).
A shape is parsed once and cached (`fixed_shape`), and its name is written canonically (`tree:4x5/16`).

A policy is configuration; planner.Planner is a policy at work in a step loop, with what it learns.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from cast_core.errors import InvalidArgument
from cast_core.selection import CastParams

# Limits of a fixed shape a request may name: the draft service's exported top-K (draft_service.config.top_k),
# the verify service's tree room (verify_service.config.max_tree_tokens), and a depth past any that pays.
MAX_SHAPE_TOP_K = 8
MAX_SHAPE_DEPTH = 16
MAX_SHAPE_VERIFIED = 128


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

    @property
    def learns(self) -> bool:
        """Whether a step loop keeps state for it between steps (CAST's gains, calibration, gate; a cascade's
        acceptance per level)."""
        return self.cast is not None or bool(self.levels)

    @property
    def tree_nodes(self) -> int:
        """The most nodes its draft tree holds, root included: layer 1 has top_k, each later layer top_k
        children of each of the (at most max_breadth) nodes the layer above kept."""
        nodes, layer = 1, self.top_k if self.max_depth else 0
        for _ in range(self.max_depth):
            nodes += layer
            layer = min(layer, self.max_breadth) * self.top_k
        return nodes


def make_policies(cast: CastParams | None = None) -> dict[str, TreePolicy]:
    """The policies a request may name; `cast` with the given thresholds (defaults: cast_core.selection's)."""
    return {
        # CAST prunes within EAGLE-2's breadth and a little more depth; what it drops depends on the cost tables.
        "cast": TreePolicy("cast", top_k=4, max_depth=8, max_breadth=8, verify_tokens=48, cast=cast or CastParams()),
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

SHAPE_SYNTAX = (f"chain:D (D in 1..{MAX_SHAPE_DEPTH}) or tree:KxD/N (top-K in 1..{MAX_SHAPE_TOP_K}, depth D in "
                f"1..{MAX_SHAPE_DEPTH}, N nodes verified in 2..{MAX_SHAPE_VERIFIED})")
_CHAIN = re.compile(r"chain:(\d+)")
_TREE = re.compile(r"tree:(\d+)x(\d+)/(\d+)")


def _in_range(value: int, low: int, high: int, what: str, spec: str) -> int:
    if not low <= value <= high:
        raise ValueError(f"{spec!r}: {what} {value} is outside [{low}, {high}]")
    return value


@functools.lru_cache(maxsize=256)
def fixed_shape(spec: str) -> TreePolicy:
    """`chain:D` or `tree:KxD/N` as a TreePolicy named canonically; ValueError saying which rule it breaks.
    Cached: a request names its shape as a string, and the step loop keys planners by name."""
    if m := _CHAIN.fullmatch(spec):
        depth = _in_range(int(m[1]), 1, MAX_SHAPE_DEPTH, "depth", spec)
        return TreePolicy(f"chain:{depth}", top_k=1, max_depth=depth, max_breadth=1, verify_tokens=depth + 1)
    if m := _TREE.fullmatch(spec):
        k = _in_range(int(m[1]), 1, MAX_SHAPE_TOP_K, "top-K", spec)
        depth = _in_range(int(m[2]), 1, MAX_SHAPE_DEPTH, "depth", spec)
        verified = _in_range(int(m[3]), 2, MAX_SHAPE_VERIFIED, "nodes verified", spec)
        return TreePolicy(f"tree:{k}x{depth}/{verified}", top_k=k, max_depth=depth, max_breadth=k,
                          verify_tokens=verified)
    raise ValueError(f"{spec!r} is not a fixed shape: {SHAPE_SYNTAX}")


def resolve_policy(name: str, default: str, policies: dict[str, TreePolicy] = POLICIES, field: str = "policy") -> TreePolicy:
    """The named policy (the default where `name` is empty), or a fixed shape; InvalidArgument naming `field`."""
    name = name or default
    policy = policies.get(name)
    if policy is not None:
        return policy
    if name.startswith(("chain:", "tree:")):
        try:
            return fixed_shape(name)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field) from None
    raise InvalidArgument(f"unknown policy {name!r}; choose one of {', '.join(sorted(policies))}, or a fixed shape "
                          f"{SHAPE_SYNTAX}", field)
