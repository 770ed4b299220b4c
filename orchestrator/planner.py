"""A tree policy at work in one step loop: whether a step drafts, what the draft may expand, which nodes the
verifier checks, and what the policy learns from the steps it ran.

For `cast` the planner owns CAST's learned state, all of it batch-wide as in the paper (a step's sequences share one
verifier forward and one draft forward per layer):
- the gain buffer (R layer-to-layer gains; the depth rule C2 reads its mean alpha),
- the value calibration (accepted tokens per unit of node value, per depth; every rule weighs the calibrated
  value, in expected tokens, against cost),
- the draft gate (whether drafting pays at all at this batch size: the depth rule at depth 0),
- the next step's Expand budget, priced while this step's Verify runs,
- the nodes per tree and the depth its reranking verified lately: the draft grows no more than 1.5x + 2 those
  nodes and 2 layers past that depth (C1 and C2 price a node against its value, not against the verifier's cut,
  and let the draft grow trees mostly thrown away: reports/cast-vs-fixed/),
- pipelined steps: the share of a prepared Expand's time that ran past the Verify it overlapped (what the next step
  waited for), per batch size. A prepared tree's budget prices the draft's forwards at that share: a draft hidden
  behind the verifier costs nothing, and CAST may grow deeper or wider trees.
Fixed trees (`eagle2`, `chain`) learn nothing: the same budget and the top `verify_tokens` nodes every step.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

import numpy as np

from cast.v1 import draft_pb2
from cast_core.selection import (GainBuffer, batch_calibrated_values, batch_gains, batch_topk_utilities,
                                 most_efficient_cut, select_count)
from cast_core.tree import TokenTree
from orchestrator.calibration import ValueCalibration
from orchestrator.costs import CostModel
from orchestrator.draft_gate import DRAFTED, PLAIN, DraftGate, arm_label
from orchestrator.policies import TreePolicy

log = logging.getLogger("cast.orchestrator")


class Planner:
    def __init__(self, policy: TreePolicy) -> None:
        self.policy = policy
        cast = policy.cast
        self.gains = GainBuffer.full_of_ones(cast.gain_buffer_size if cast else 1)
        self.calibration = ValueCalibration()
        self.gate = DraftGate() if cast else None
        self.arms: tuple[str, ...] | None = None  # the gate's arms this step can run (None: all of the gate's)
        # CAST: per batch size, the nodes per tree and the depth that reranking verified in its last steps
        self.verified_counts: dict[int, deque[int]] = {}
        self.verified_depths: dict[int, deque[int]] = {}
        # The next step's budgets, per pairing (CostModel) they were priced for: id -> ((batch, table cells), budget)
        self.prepared: dict[int, tuple[tuple, draft_pb2.ExpandBudget]] = {}
        self.exposed: dict[int, float] = {}  # per batch size: the part of a prepared Expand the next step waited for

    @property
    def value_scale(self) -> float:
        """One scale for all depths (a cascade's lookup level converts its acceptance rates with it)."""
        return self.calibration.scale if self.policy.cast else 1.0

    def depth_scales(self) -> list[float]:
        """CAST: accepted tokens per unit of value at depths 1..max_depth, as the draft and reranking use them."""
        return self.calibration.scales(max(self.policy.max_depth, 1))

    def drafts(self, costs: CostModel, batch: int, context: int, histories: Sequence[Sequence[int]] = ()) -> bool:
        """Whether this step drafts; if not, its sequences verify their roots alone (a plain decoding step).
        `histories`: the sequences' tokens so far (a cascade reads whether they are copying)."""
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

    def prepared_budget(self, costs: CostModel, batch: int, context: int) -> draft_pb2.ExpandBudget:
        """The budget of a prepared Expand (drafted while a Verify runs): its draft time priced at the share that
        delayed the next steps lately (all of it until measured)."""
        return self.price_budget(costs, batch, context, self.exposed.get(batch, 1.0))

    def learn_exposed(self, batch: int, expand_ms: float, delay_ms: float) -> None:
        """A prepared Expand took `expand_ms`, of which `delay_ms` ran past the Verify it overlapped."""
        if self.policy.cast is not None and expand_ms > 0:
            share = min(max(delay_ms / expand_ms, 0.0), 1.0)
            old = self.exposed.get(batch)
            self.exposed[batch] = share if old is None else 0.8 * old + 0.2 * share

    def price_budget(self, costs: CostModel, batch: int, context: int,
                     draft_share: float = 1.0) -> draft_pb2.ExpandBudget:
        """What the draft may expand. Trees come back trimmed to the most nodes `select` can keep. For CAST: the
        draft's cost slice, the thresholds and the calibration per depth; every rule weighs a node's calibrated
        value (its expected tokens) against cost. draft_share: the part of the draft's time the step waits for
        (costs.draft_slice)."""
        policy = self.policy
        budget = draft_pb2.ExpandBudget(top_k=policy.top_k, max_depth=policy.max_depth,
                                        max_breadth=policy.max_breadth, max_returned_nodes=policy.verify_tokens)
        if policy.cast is not None:
            budget.max_returned_nodes = self.returned_nodes(batch)
            budget.max_depth = self.draft_depth(batch)
            prices = costs.draft_slice(batch, context, draft_share)
            budget.cast.CopyFrom(draft_pb2.CastBudget(
                node_buckets=prices.node_buckets,
                token_counts=prices.token_counts,
                normalized_cost=np.asarray(prices.normalized_cost).ravel().tolist(),
                breadth_threshold=policy.cast.breadth_threshold,
                depth_threshold=policy.cast.depth_threshold,
                gain_mean=self.gains.alpha,
                depth_scales=self.depth_scales(),
                # Where the verifier runs on a GPU, depth also stops where another layer would lower the step's
                # expected tokens per unit of cost (it won there at batch 8; on a CPU it lost to C2 alone).
                step_base_cost=(costs.drafted_step_base(batch, context, draft_share) if costs.verifier_on_gpu
                                else 0.0),
            ))
        return budget

    def draft_costs(self, costs: CostModel) -> CostModel:
        """The prices an Expand of this policy is measured against (a cascade: its level's)."""
        return costs

    def returned_nodes(self, batch: int) -> int:
        """CAST: how many nodes per tree the draft returns, and so grows (it expands no node that could not be
        among them): the most that reranking would have verified in the last R steps at this batch size with their
        Expands not yet paid (`select`), with room to grow (x1.5 + 2), within the policy's verify_tokens. Before any
        step at this batch size: verify_tokens."""
        recent = self.verified_counts.get(batch)
        if not recent:
            return self.policy.verify_tokens
        return min(self.policy.verify_tokens, math.ceil(1.5 * max(recent)) + 2)

    def draft_depth(self, batch: int) -> int:
        """CAST: the most layers the draft may grow: the deepest that reranking verified in the last R steps at this
        batch size, plus 2 (room to grow), within the policy's max_depth. A layer below what is ever verified costs
        a draft forward and returns nothing that is checked; C2 cannot see that, as it prices a layer against its
        value, not against the verifier's cut."""
        recent = self.verified_depths.get(batch)
        if not recent:
            return self.policy.max_depth
        return min(self.policy.max_depth, max(recent) + 2)

    def select(self, trees: list[TokenTree], costs: CostModel, batch: int, context: int,
               draft_ms: float = 0.0) -> list[TokenTree]:
        """The nodes to verify per tree: the root and the best nodes by value (closed under ancestors).

        CAST picks one m for the whole batch, which shares one verifier forward: the reranking rule (C3) bounds it,
        then, within that bound, the cut with the most expected tokens per unit of step cost. Both rank and sum the
        nodes' calibrated values (selection.calibrated_values: expected tokens, per depth). The step's cost
        includes what its Expand took (`draft_ms`, paid whatever m is): priced on the verifier alone, the cut
        favoured a few nodes where the verifier's cost is flat in m (a CPU at batch 1) and the draft is a third
        of the step."""
        m = self.policy.verify_tokens
        if self.policy.cast is not None:
            scales = self.depth_scales()
            keys = batch_calibrated_values(trees, scales)
            utilities = batch_topk_utilities(keys)  # [max N]
            prices = costs.rerank_costs(batch, context, utilities.shape[0])
            m = min(select_count(utilities, prices, self.policy.cast.rerank_threshold), m)
            step = prices + draft_ms / costs.verify_step_ms(batch, context, 1)  # the same unit: one plain step
            # The next drafts return (and grow) what this cut would verify were the draft not yet paid: a cut that
            # counts the Expand it already paid verifies more the bigger that draft grew, and a bound grown from it
            # let the draft grow bigger still (CPU, batch 8: 66 nodes expanded and 16 verified for 3.8 tokens in
            # 107 ms, against chain:3's 3.05 in 52; reports/cast-vs-fixed/ round 13).
            unpaid = most_efficient_cut(utilities, prices, m)
            m = most_efficient_cut(utilities, step, m)
            chosen = [t.top_m(m, k) for t, k in zip(trees, keys)]
            size = self.policy.cast.gain_buffer_size
            self.verified_counts.setdefault(batch, deque(maxlen=size)).append(unpaid)
            self.verified_depths.setdefault(batch, deque(maxlen=size)).append(max(t.max_depth for t in chosen))
            return chosen
        return [t.top_m(m) for t in trees]

    def learn_layers(self, layer_utilities: list[list[float]]) -> None:
        """An Expand's per-sequence layer utilities u^(i): CAST's gain buffer takes the batch's gains."""
        if self.policy.cast is not None:
            self.gains = batch_gains(self.gains, layer_utilities)

    def learn_step(self, batch: int, drafted: bool, verified: list[TokenTree], committed: list[int],
                   step_ms: float, one_off: bool, switch: bool = False) -> bool:
        """A verified step of this policy's sequences: their trees, the tokens each committed, the step's time.
        A one-off step (a graph capture, a prefill, a draft catching up) teaches the calibration but not the
        gate, which judges step times; one whose draft only caught up (`switch`) tells the gate what switching to
        drafting costs. Returns whether the draft gate switched (its winner at this batch size changed: drafting
        or plain decoding; for a cascade, also from one model level or lookup alone to another)."""
        if self.policy.cast is None:
            return False
        if drafted:
            self.calibration.observe(verified, committed)
        if one_off:
            if switch and drafted:
                self.gate.charge_switch(batch, self.step_arm(drafted), step_ms)
            return False
        was = self.gate.winner(batch, self.arms)
        self.gate.record(batch, self.step_arm(drafted), sum(committed) / len(committed), step_ms, self.arms)
        now = self.gate.winner(batch, self.arms)
        if now == was:
            return False
        arms = self.arms or self.gate.arms
        log.info("%s at batch %d: %s now (%s)", self.gate_name(), batch, arm_label(now, arms),
                 self.gate.describe(batch, arms))
        return True

    def gate_name(self) -> str:
        """The step's gate, as the log names it."""
        return self.policy.name

    def step_arm(self, drafted: bool) -> str:
        """The gate's arm that the step ran."""
        return DRAFTED if drafted else PLAIN

    def step_kind(self, drafted: bool) -> tuple[str, str]:
        """The step as its stats name it (StepStats.arm and .mode): `cast` and fixed trees have no modes."""
        return self.step_arm(drafted), ""


class Planners:
    """A step loop's planners, one per policy name. A learning policy's planner (`cast`) is kept for good: it holds
    what the policy learned. Fixed shapes learn nothing, so theirs are kept only for reuse, at most `max_fixed`
    of them (the least recently used goes): requests that name ever new shapes cannot grow a loop's state."""

    def __init__(self, make: Callable[[TreePolicy], Planner] = Planner, max_fixed: int = 32) -> None:
        self.make = make  # a policy's planner (a cascade's: cascade.make_planner)
        self.max_fixed = max_fixed
        self.learning: dict[str, Planner] = {}
        self.fixed: OrderedDict[str, Planner] = OrderedDict()

    def get(self, policy: TreePolicy) -> Planner:
        kept = self.learning if policy.learns else self.fixed
        planner = kept.get(policy.name)
        if planner is None:
            planner = kept[policy.name] = self.make(policy)
        if not policy.learns:
            self.fixed.move_to_end(policy.name)
            while len(self.fixed) > self.max_fixed:
                self.fixed.popitem(last=False)
        return planner

    def __len__(self) -> int:
        return len(self.learning) + len(self.fixed)
