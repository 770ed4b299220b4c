"""A tree policy at work in one step loop: whether a step drafts, what the draft may expand, which nodes the
verifier checks, and what the policy learns from the steps it ran.

For `cast` the planner owns CAST's learned state, all of it batch-wide as in the paper (a step's sequences share one
verifier forward and one draft forward per layer):
- the gain buffer (R layer-to-layer gains; the depth rule C2 reads its mean alpha),
- the value calibration (accepted tokens per unit of node value; every rule weighs value against cost),
- the draft gate (whether drafting pays at all at this batch size: the depth rule at depth 0),
- the next step's Expand budget, priced while this step's Verify runs.
Fixed trees (`eagle2`, `chain`) learn nothing: the same budget and the top `verify_tokens` nodes every step.
"""

from __future__ import annotations

import logging

import numpy as np

from cast.v1 import draft_pb2
from cast_core.selection import GainBuffer, batch_gains, batch_topk_utilities, most_efficient_cut, select_count
from cast_core.tree import TokenTree
from orchestrator.calibration import ValueCalibration
from orchestrator.costs import CostModel
from orchestrator.draft_gate import DraftGate
from orchestrator.policies import TreePolicy

log = logging.getLogger("cast.orchestrator")


class Planner:
    def __init__(self, policy: TreePolicy) -> None:
        self.policy = policy
        cast = policy.cast
        self.gains = GainBuffer.full_of_ones(cast.gain_buffer_size if cast else 1)
        self.calibration = ValueCalibration()
        self.gate = DraftGate() if cast else None
        # The next step's budgets, per pairing (CostModel) they were priced for: id -> ((batch, table cells), budget)
        self.prepared: dict[int, tuple[tuple, draft_pb2.ExpandBudget]] = {}

    @property
    def value_scale(self) -> float:
        return self.calibration.scale if self.policy.cast else 1.0

    def drafts(self, costs: CostModel, batch: int, context: int) -> bool:
        """Whether this step drafts; if not, its sequences verify their roots alone (a plain decoding step)."""
        if self.gate is None:
            return True
        self.gate.expect_plain(batch, costs.verify_step_ms(batch, context, 1))
        drafts = self.gate.should_draft(batch)
        if not drafts:
            self.prepared.clear()  # it would be stale by the time this policy drafts again
        return drafts

    def budget(self, costs: CostModel, batch: int, context: int) -> draft_pb2.ExpandBudget:
        """The Expand budget: the one prepared during the last Verify where it prices the same table cells (its
        online corrections and calibration are one step older), else priced now."""
        prepared = self.prepared.pop(id(costs), None)
        if prepared is not None and prepared[0] == (batch, costs.price_cells(batch, context)):
            return prepared[1]
        return self.price_budget(costs, batch, context)

    def prepare_budget(self, costs: CostModel, batch: int, context: int) -> None:
        """Price the next step's budget (called while this step's Verify runs)."""
        self.prepared[id(costs)] = ((batch, costs.price_cells(batch, context)), self.price_budget(costs, batch, context))

    def price_budget(self, costs: CostModel, batch: int, context: int) -> draft_pb2.ExpandBudget:
        """What the draft may expand. Trees come back trimmed to the most nodes `select` can keep. For CAST: the
        draft's cost slice and the thresholds; every rule weighs value against cost, so scaling the values by the
        calibration is dividing the thresholds C1 and C2 by it."""
        policy = self.policy
        budget = draft_pb2.ExpandBudget(top_k=policy.top_k, max_depth=policy.max_depth,
                                        max_breadth=policy.max_breadth, max_returned_nodes=policy.verify_tokens)
        if policy.cast is not None:
            prices = costs.draft_slice(batch, context)
            scale = self.value_scale
            budget.cast.CopyFrom(draft_pb2.CastBudget(
                node_buckets=prices.node_buckets,
                token_counts=prices.token_counts,
                normalized_cost=np.asarray(prices.normalized_cost).ravel().tolist(),
                breadth_threshold=policy.cast.breadth_threshold / scale,
                depth_threshold=policy.cast.depth_threshold / scale,
                gain_mean=self.gains.alpha,
                value_scale=scale,
                # Where the verifier runs on a GPU, depth also stops where another layer would lower the step's
                # expected tokens per unit of cost (it won there at batch 8; on a CPU it lost to C2 alone).
                step_base_cost=costs.drafted_step_base(batch, context) if costs.verifier_on_gpu else 0.0,
            ))
        return budget

    def draft_costs(self, costs: CostModel) -> CostModel:
        """The prices an Expand of this policy is measured against (a cascade: its level's)."""
        return costs

    def select(self, trees: list[TokenTree], costs: CostModel, batch: int, context: int) -> list[TokenTree]:
        """The nodes to verify per tree: the root and the best nodes by value (closed under ancestors).

        CAST picks one m for the whole batch, which shares one verifier forward: the reranking rule (C3) bounds it,
        then, within that bound, the cut with the most expected tokens per unit of step cost."""
        m = self.policy.verify_tokens
        if self.policy.cast is not None:
            utilities = batch_topk_utilities([t.values for t in trees])  # [max N]
            prices = costs.rerank_costs(batch, context, utilities.shape[0])
            scale = self.value_scale
            m = min(select_count(utilities, prices, self.policy.cast.rerank_threshold / scale), m)
            m = most_efficient_cut(utilities, prices, m, scale)
        return [t.top_m(m) for t in trees]

    def learn_layers(self, layer_utilities: list[list[float]]) -> None:
        """An Expand's per-sequence layer utilities u^(i): CAST's gain buffer takes the batch's gains."""
        if self.policy.cast is not None:
            self.gains = batch_gains(self.gains, layer_utilities)

    def learn_step(self, batch: int, drafted: bool, verified: list[TokenTree], committed: list[int],
                   step_ms: float, one_off: bool) -> None:
        """A verified step of this policy's sequences: their trees, the tokens each committed, the step's time.
        A one-off step (a graph capture, a prefill, a draft catching up) teaches the calibration but not the
        gate, which judges step times."""
        if self.policy.cast is None:
            return
        if drafted:
            self.calibration.observe(sum(float(t.values[1:].sum()) for t in verified),
                                     sum(n - 1 for n in committed))
        if one_off:
            return
        was = self.gate.winner_drafts(batch)
        self.gate.observe(batch, drafted, sum(committed) / len(committed), step_ms)
        if self.gate.winner_drafts(batch) != was:
            log.info("%s at batch %d: %s now (%s)", self.policy.name, batch, "plain decoding" if was else "drafting",
                     self.gate.describe(batch))
