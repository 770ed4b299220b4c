"""Tree policies a request may name: what the draft expands and which nodes the verifier checks.

`cast`   (default) CAST: the draft prunes breadth (C1) and depth (C2) from its cost slice inside Expand; here the
         reranking (C3) picks how many of the expanded nodes to verify, from the verifier's cost table at the live
         batch size, and a buffer of the last R layer-to-layer gains predicts what another layer is worth.
`eagle2` fixed depth, top-K per layer, the best `verify_tokens` nodes by value are verified.
`chain`  one child per node, a fixed length, like transformers' assisted generation.
`ar`     no draft: each step verifies the root alone, which is plain autoregressive decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cast.v1 import draft_pb2
from cast_core.errors import InvalidArgument
from cast_core.selection import CastParams, GainBuffer, batch_topk_utilities, layer_gains, select_count
from cast_core.tree import TokenTree
from orchestrator.costs import CostModel


@dataclass(frozen=True)
class TreePolicy:
    name: str
    top_k: int = 0            # children per kept node; 0: no draft
    max_depth: int = 0        # layers of candidates
    max_breadth: int = 0      # nodes kept per layer
    verify_tokens: int = 1    # nodes sent to the verifier at most, root included
    cast: CastParams | None = None

    @property
    def uses_draft(self) -> bool:
        return self.max_depth > 0

    def budget(self, depth: int, costs: CostModel, batch: int, context: int, gains: GainBuffer,
               value_scale: float = 1.0) -> draft_pb2.ExpandBudget:
        """What the draft may expand. value_scale: accepted tokens per unit of node value (AcceptanceScale); the
        rules weigh value against cost, so scaling every value is dividing the thresholds C1 and C2 by it."""
        # Trees come back trimmed to the most nodes select() can keep: the rest only cost transfer and parsing.
        budget = draft_pb2.ExpandBudget(top_k=self.top_k, max_depth=depth, max_breadth=self.max_breadth,
                                        max_returned_nodes=self.verify_tokens)
        if self.cast is not None:
            prices = costs.draft_slice(batch, context)
            budget.cast.CopyFrom(
                draft_pb2.CastBudget(
                    node_buckets=prices.node_buckets,
                    token_counts=prices.token_counts,
                    normalized_cost=np.asarray(prices.normalized_cost).ravel().tolist(),
                    breadth_threshold=self.cast.breadth_threshold / value_scale,
                    depth_threshold=self.cast.depth_threshold / value_scale,
                    gain_mean=gains.alpha,
                    value_scale=value_scale,
                    step_base_cost=costs.drafted_step_base(batch, context) if self.efficient_depth(costs) else 0.0,
                )
            )
        return budget

    def efficient_depth(self, costs: CostModel) -> bool:
        """CAST's efficiency rule for depth: as configured, or (auto) where the verifier runs on a GPU."""
        if self.cast is None:
            return False
        if self.cast.efficient_depth is None:
            return costs.verifier_on_gpu
        return self.cast.efficient_depth

    def select(self, expanded: list[TokenTree], costs: CostModel, batch: int, context: int,
               value_scale: float = 1.0) -> list[TokenTree]:
        """The nodes to verify per tree: the root and the best nodes by value (closed under ancestors).

        CAST picks one m for the whole batch, which shares one verifier forward: the reranking rule (C3) bounds it,
        then, within that bound, the cut with the most expected tokens per unit of step cost (u_m / c_m). A fixed
        threshold alone keeps nodes whose value beats their marginal cost yet lowers the step's tokens per unit
        cost, which on hardware where cost grows with batch × nodes (CPUs, large batches) loses to plain decoding.
        Node values count value_scale accepted tokens each (the root, always committed, counts one).
        """
        m = self.verify_tokens
        if self.cast is not None:
            # The reranking rule (rerank_count) and the cut share one sort of the values.
            utilities = batch_topk_utilities([t.values for t in expanded])  # [max N]
            prices = costs.rerank_costs(batch, context, utilities.shape[0])
            m = min(select_count(utilities, prices, self.cast.rerank_threshold / value_scale), m)
            m = most_efficient_cut(utilities, prices, m, value_scale)
        return [t.top_m(m) for t in expanded]


def most_efficient_cut(utilities: np.ndarray, costs: np.ndarray, limit: int, value_scale: float = 1.0) -> int:
    """argmax over m <= limit of u_m / c_m: u_m the batch-average expected tokens of each tree's top m nodes (the
    root's 1, then value_scale per unit of the others' values), c_m costs[m-1].

    utilities: [max N] batch_topk_utilities of the trees' values.
    """
    expected = 1 + value_scale * (utilities[:limit] - 1)  # [limit]
    return int(np.argmax(expected / costs[: expected.shape[0]])) + 1


def update_gains(gains: GainBuffer, per_sequence: list[list[float]]) -> GainBuffer:
    """Push this step's layer-to-layer gains phi = u^(i+1) / u^(i) into the buffer, u^(i) the batch average
    (the paper's: the depth rule tests the batch average too). One gain per layer, not per sequence: at batch 8 a
    push per sequence replaced the whole buffer (R = 8) with one step's first layers.

    per_sequence: each sequence's u^(i) per layer, as the draft measured them (kept_layer_utilities)."""
    if not per_sequence:
        return gains
    depth = max(len(u) for u in per_sequence)
    batch_average = [sum(u[i] for u in per_sequence if i < len(u)) / len(per_sequence) for i in range(depth)]
    return gains.extend(layer_gains(batch_average))


def make_policies(cast: CastParams | None = None) -> dict[str, TreePolicy]:
    """The policies a request may name; `cast` with the given thresholds (defaults: cast_core.selection's)."""
    return {
        # CAST prunes within EAGLE-2's breadth and a little more depth; what it drops depends on the cost tables.
        "cast": TreePolicy("cast", top_k=8, max_depth=8, max_breadth=8, verify_tokens=48, cast=cast or CastParams()),
        "eagle2": TreePolicy("eagle2", top_k=8, max_depth=6, max_breadth=8, verify_tokens=32),
        "chain": TreePolicy("chain", top_k=1, max_depth=4, max_breadth=1, verify_tokens=5),
        "ar": TreePolicy("ar"),
    }


POLICIES = make_policies()


def resolve_policy(name: str, default: str, policies: dict[str, TreePolicy] = POLICIES, field: str = "policy") -> TreePolicy:
    policy = policies.get(name or default)
    if policy is None:
        raise InvalidArgument(f"unknown policy {name!r}; choose one of {', '.join(sorted(policies))}", field)
    return policy
