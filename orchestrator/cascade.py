"""The `cascade` policy at work: a Dynamic Tree Cascade (DyTC, CAS-Spec arXiv 2510.26843) over the draft levels a
draft replica serves (small model, sparse target, prompt lookup), priced as CAST prices layers and judged on
measured steps.

Per step, for the step's batch:
1. The draft gate (orchestrator/draft_gate.py) picks the step's arm: one per model level of the policy that the
   replica serves, with lookup's chain riding along where the policy has lookup; lookup alone; or plain decoding.
   Each arm is judged as `cast`'s gate judges drafting against plain decoding: tokens committed per sequence per ms
   of the whole step, per batch size, the losers probed now and then. Until an arm's own steps judge it, a model
   level counts at DyTC's price: its expected accepted tokens, from the acceptance learned online per level and
   tree depth (`LevelAcceptance`), lookup's included, against the step's cost with it, from that level's own cost
   table (Describe's draft_levels) and the verifier's; plain decoding at the verifier's one-token step. Lookup alone
   is not priced (with the same acceptance prior as a model level it would look as good for nothing and win every
   first step): it is measured early instead, as every unjudged arm is. So a model level that does not pay is
   dropped and lookup's nearly free chains kept, or plain decoding runs where nothing pays; and the model level is
   the one that measured best, not the one the tables price best.
   With lookup among its levels, the gate and the acceptance are kept per mode: whether most of the batch's
   sequences are copying (lookup's match agrees over their last COPYING tokens: cast_core/lookup.py match_run), or
   writing. Copying, lookup's chains are mostly accepted whole and lookup alone may beat any model level; writing,
   they mostly miss and a model level wins. One learner for both judged each arm on the mix: lookup alone won the
   edit set on the GPU and the cascade trailed it by 8 % (reports/cascade/), drafting with no model where the text
   was new. A mode starts a batch size from what the other judged of plain decoding and the model levels (their
   steps cost the same in both; lookup alone is what differs), so a level far behind is measured once, not per mode;
   copying, lookup alone is measured first. Where lookup finds nothing for the batch, lookup alone is no arm
   (its step would be a plain one with an Expand call added): the step runs the mode's best model level or plain.
2. Lookup's chain comes first and is worth the learned acceptance of lookup chains, so the merged tree keeps it
   where lookup has been right and drops it where not. The arm's model level drafts the rest of the tree with
   CAST's breadth and depth rules inside Expand (its own Planner: gain buffer and value calibration per level).
3. The draft service runs lookup and the chosen level inside the one Expand and merges their trees by token path;
   CAST's reranking (C3) then picks the nodes to verify from the combined tree, as for `cast`. Lookup alone
   verifies its whole chain (`select`): its acceptance is learned from what is verified.

What the paper's DyTC does beyond this: it routes each *layer* of the tree to a level (lookup proposes, the sparse
target extends, the small draft fills breadth); here a step's model part comes from one level, chosen per step and
batch size. Draft lengths are set from the same estimates: a model level's by CAST's depth rule, lookup alone's by
`lookup_length` (lookup riding along a model level keeps the policy's depth: CAST's rerank cuts the merged tree).

`cascade-fixed` is the fixed vertical cascade to compare against: every level of the policy drafts every step with
fixed budgets, and the best `verify_tokens` nodes of the merged tree are verified.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cast.v1 import draft_pb2
from cast_core.lookup import match_run
from cast_core.tree import TokenTree
from orchestrator.costs import CostModel
from orchestrator.draft_gate import DRAFTED, LOOKUP, PLAIN, DraftGate
from orchestrator.planner import Planner
from orchestrator.policies import TreePolicy

log = logging.getLogger("cast.orchestrator")

COPYING = 4            # a sequence whose last 4+ tokens agree with lookup's match is copying (module docstring)
COPYING_SAMPLE = 8     # ... of at most this many of the batch's sequences (each costs ~25 us for 2000 tokens)
PRIOR_RATE = 0.5        # a level's acceptance per depth before it is measured
PRIOR_WEIGHT = 4.0      # ... worth this many observations
WEIGHT = 0.05           # moving-average weight of one observation once past the prior
MAX_DEPTH = 64          # the deepest acceptance learned; lookup alone's longest chain (the draft service's too)
LOOKUP_PRICED_AFTER = 16  # lookup chains offered in a mode before lookup alone's tokens come from their acceptance


@dataclass
class LevelAcceptance:
    """Per level and tree depth d: how often, when the level proposed children of the accepted node at depth d-1,
    one of them was accepted. The product over depths 1..d estimates the chance the level's path reaches d."""

    offered: dict[str, np.ndarray] = field(default_factory=lambda: defaultdict(lambda: np.zeros(MAX_DEPTH + 1)))
    accepted: dict[str, np.ndarray] = field(default_factory=lambda: defaultdict(lambda: np.zeros(MAX_DEPTH + 1)))
    proposed: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # [steps with a
                                                                                               # node, steps]

    def rates(self, level: str, depth: int) -> np.ndarray:
        """[depth] the acceptance at depths 1..depth (the prior where unmeasured)."""
        off, acc = self.offered[level][1: depth + 1], self.accepted[level][1: depth + 1]
        return (acc + PRIOR_RATE * PRIOR_WEIGHT) / (off + PRIOR_WEIGHT)

    def propose_rate(self, level: str) -> float:
        """The share of drafted steps in which the level proposed anything (lookup: found a match)."""
        hits, steps = self.proposed[level]
        return (hits + PRIOR_WEIGHT) / (steps + PRIOR_WEIGHT)

    def extrapolated_rates(self, level: str, depth: int) -> np.ndarray:
        """[depth] as `rates`, except that depths past the deepest one measured (offered PRIOR_WEIGHT times or more)
        take that one's rate: a chain longer than any proposed yet is priced as the text so far went on, not at the
        prior (which would never let it grow to be measured)."""
        rates = self.rates(level, depth)
        measured = np.flatnonzero(self.offered[level][1: depth + 1] >= PRIOR_WEIGHT)
        if measured.size:
            rates[measured[-1] + 1:] = rates[measured[-1]]
        return rates

    def expected_tokens(self, level: str, depth: int) -> float:
        """Accepted tokens a step expects from the level's part of the tree, up to `depth` (bonus excluded)."""
        return self.propose_rate(level) * float(np.cumprod(self.rates(level, depth)).sum())

    def tries(self, level: str) -> int:
        return self.proposed[level][1]

    def observe(self, tree: TokenTree, levels: list[str | None], committed: list[int]) -> None:
        """One verified tree: `levels` names each node's level (root: None), `committed` the tokens the step
        committed (the accepted path's tokens, then the bonus token)."""
        for level in set(levels) - {None}:
            self.proposed[level][0] += 1
        node, accepted_path = 0, committed[:-1]
        for depth in range(1, min(tree.max_depth, MAX_DEPTH) + 1):
            children = np.nonzero(tree.parents == node)[0]
            if children.size == 0:
                break
            for level in {levels[c] for c in children}:
                self._count(self.offered, level, depth)
            token = accepted_path[depth - 1] if depth - 1 < len(accepted_path) else None
            hit = next((int(c) for c in children if int(tree.tokens[c]) == token), None)
            if hit is None:
                break
            self._count(self.accepted, levels[hit], depth)
            node = hit

    def count_step(self, levels: set[str]) -> None:
        for level in levels:
            self.proposed[level][1] += 1

    @staticmethod
    def _count(table, level: str, depth: int) -> None:
        table[level][depth] += 1


class CascadePlanner(Planner):
    """A cascade policy at work in one step loop (the module docstring); `cast`'s Planner per model level."""

    def __init__(self, policy: TreePolicy) -> None:
        super().__init__(policy)
        # Per mode (copying or writing, the module docstring): the levels' acceptance and the gate; the step's in
        # self.acceptance and self.gate.
        self.acceptances = {copying: LevelAcceptance() for copying in (False, True)}
        # A model level's step commits at most its tree's depth and the target's token (lookup riding along drafts
        # no deeper): where even that is behind the winner, the gate does not probe it (draft_gate.py cannot_win).
        ceilings = {level: 1.0 + policy.max_depth for level in policy.levels if level != LOOKUP}
        self.gates = {copying: DraftGate(arms=arm_names(policy.levels, copying), ceilings=dict(ceilings))
                      for copying in (False, True)}
        self.copying = False
        self.acceptance = self.acceptances[False]
        self.levels: dict[str, Planner] = {}  # per model level: its CAST state
        if self.gate is not None:
            self.gate = self.gates[False]
        self.arm: str | None = None           # this step's arm (the gate's choice)
        self.plan: list[str] = []             # this step's levels, in the Expand's order
        self.chosen: str | None = None        # this step's model level

    # --- the step's arm ---------------------------------------------------------------------------------------

    def served(self, costs: CostModel) -> list[str]:
        """The policy's levels that the draft replica serves (costs.levels: its levels' prices)."""
        return [level for level in self.policy.levels if level in costs.levels]

    def drafts(self, costs: CostModel, batch: int, context: int, histories: Sequence[Sequence[int]] = ()) -> bool:
        runs = match_runs(histories) if LOOKUP in self.policy.levels else []  # without lookup, one mode
        self.copying = copying(runs)
        self.acceptance = self.acceptances[self.copying]
        if self.gate is not None:
            self.gate = self.gates[self.copying]
        served = self.served(costs)
        if not served:
            self.arms = (PLAIN,)
            return False
        if self.gate is None:
            return True  # a fixed cascade: every level, every step
        self.arms = arm_names(served, self.copying, finds=finds(runs))
        self.gate.borrow(self.gates[not self.copying], batch)  # what the other mode judged (draft_gate.py borrow)
        for arm in self.arms:
            price = self.step_price(arm, costs, batch, context)
            if price is not None:
                self.gate.expect(batch, arm, *price)
        if LOOKUP in self.arms and self.acceptance.offered[LOOKUP][1] >= LOOKUP_PRICED_AFTER:
            tokens, millis = self.lookup_alone_price(costs, batch, context, found_share(runs))
            self.gate.expect(batch, LOOKUP, tokens, millis)
            self.gate.reprice(batch, LOOKUP, tokens)
        self.arm = self.gate.choose(batch, self.arms)
        if self.arm == PLAIN:
            self.prepared.clear()
        return self.arm != PLAIN

    def mode(self) -> str:
        return "copying" if self.copying else "writing"

    def gate_name(self) -> str:
        return f"{self.policy.name}, {self.mode()}"

    def step_arm(self, drafted: bool) -> str:
        if not drafted:
            return PLAIN
        return self.arm if self.arm is not None else DRAFTED  # no gate (a fixed cascade): every level drafted

    def step_kind(self, drafted: bool) -> tuple[str, str]:
        return self.step_arm(drafted), self.mode() if LOOKUP in self.policy.levels else ""

    def step_price(self, arm: str, costs: CostModel, batch: int, context: int) -> tuple[float, float] | None:
        """DyTC's price of a step of this arm: (tokens committed per sequence, ms), lookup's part included where
        the replica serves lookup. Lookup alone: None (not priced; the module docstring)."""
        if arm == PLAIN:
            return 1.0, costs.verify_step_ms(batch, context, 1)
        if arm == LOOKUP:
            return None
        level = costs.levels[arm]
        depth = self.policy.max_depth
        expected = self.acceptance.expected_tokens(arm, depth)
        if LOOKUP in costs.levels and LOOKUP in self.policy.levels:
            expected = max(expected, self.acceptance.expected_tokens(LOOKUP, depth))
        width = min(self.policy.max_breadth, 4)  # a typical CAST layer
        nodes = min(1 + depth * width, self.policy.verify_tokens)
        millis = (level.verify_step_ms(batch, context, nodes) + level.draft_call_ms.get(batch, 0.0)
                  + sum(level.draft_forward_ms(batch, context + d * width, width) for d in range(depth)))
        return 1.0 + expected, millis

    def model_level(self, costs: CostModel, batch: int, context: int) -> str | None:
        """The step's model level (None: lookup alone): the gate's arm; where this replica does not serve it, or
        no gate chose (a budget priced outside a step), the served model level with the best price."""
        served = self.served(costs)
        if self.arm in served:
            return None if self.arm == LOOKUP else self.arm
        models = [level for level in served if level != LOOKUP]
        if not models:
            return None
        return max(models, key=lambda level: rate(self.step_price(level, costs, batch, context)))

    def level_planner(self, level: str) -> Planner:
        planner = self.levels.get(level)
        if planner is None:
            planner = self.levels[level] = Planner(TreePolicy(
                f"{self.policy.name}/{level}", self.policy.top_k, self.policy.max_depth, self.policy.max_breadth,
                self.policy.verify_tokens, self.policy.cast))
        return planner

    def budget(self, costs: CostModel, batch: int, context: int) -> draft_pb2.CascadeBudget:
        """This step's cascade: lookup first (where the policy has it), then the model level of the gate's arm
        (none for lookup alone) or, for a fixed cascade, every model level. Priced now: the chosen level decides
        which prices apply."""
        served = self.served(costs)
        self.plan = [level for level in served if level == "lookup"]
        if self.policy.cast is None:
            self.plan += [level for level in served if level != "lookup"]
            self.chosen = next((level for level in self.plan if level != "lookup"), None)
        else:
            self.chosen = self.model_level(costs, batch, context)
            self.plan += [self.chosen] if self.chosen else []
        scale = self.level_planner(self.chosen).value_scale if self.chosen else 1.0
        out = draft_pb2.CascadeBudget(max_returned_nodes=self.policy.verify_tokens)
        for level in self.plan:
            if level == "lookup":
                alone = self.chosen is None and self.policy.cast is not None
                length = self.lookup_length(costs, batch, context) if alone else self.policy.max_depth
                # In the model level's value unit: its calibration says how many tokens a unit of value is worth.
                rates = (self.acceptance.extrapolated_rates if alone else self.acceptance.rates)("lookup", length)
                rates = rates / scale
                out.levels.add(level="lookup", budget=draft_pb2.ExpandBudget(max_depth=length),
                               acceptance=rates.tolist())
            else:
                planner = self.level_planner(level)
                out.levels.add(level=level, budget=planner.price_budget(costs.levels[level], batch, context))
        self.acceptance.count_step(set(self.plan))
        return out

    def lookup_length(self, costs: CostModel, batch: int, context: int) -> int:
        """Lookup alone: its chain's length, as DyTC sets a level's draft length: the one whose step commits the
        most tokens per ms, from lookup's acceptance per depth (this mode's, extrapolated past the deepest measured)
        against the verifier's cost of 1 + length tokens. Copying, chains are mostly accepted whole and grow past
        the policy's depth (at CPU prices, to ~20 at a 0.9 rate a token); writing, they shrink."""
        tokens, millis = self.lookup_prices(costs, batch, context, self.acceptance.propose_rate(LOOKUP))
        return int(np.argmax(tokens / millis)) + 1

    def lookup_alone_price(self, costs: CostModel, batch: int, context: int, share: float) -> tuple[float, float]:
        """What a lookup-alone step commits per sequence, `share` of the batch's sequences having found a chain,
        and what it costs, at its chain's length (`lookup_length`). The gate judges lookup alone on these tokens
        and its own steps' time (draft_gate.py reprice): its acceptance per depth is learned from every step
        that verifies a chain of it, riding along a model level too, where its own steps are few and commit 1 or 9
        tokens as the chain misses or hits (the CPU's edit set, writing: 16 lookup-alone steps against 109 of the
        small draft, which commits 0.17 tokens a ms where lookup alone commits 0.30 on what it finds)."""
        length = self.lookup_length(costs, batch, context)
        tokens, millis = self.lookup_prices(costs, batch, context, share)
        return float(tokens[length - 1]), float(millis[length - 1])

    def lookup_prices(self, costs: CostModel, batch: int, context: int,
                      share: float) -> tuple[np.ndarray, np.ndarray]:
        """[longest] tokens committed per sequence and [longest] ms of a lookup-alone step, for chains of 1..longest
        tokens proposed to `share` of the batch's sequences."""
        level = costs.levels.get(LOOKUP, costs)
        longest = max(1, min(MAX_DEPTH, self.policy.verify_tokens - 1))
        reach = np.cumprod(self.acceptance.extrapolated_rates(LOOKUP, longest))  # [longest] P(path reaches d)
        tokens = 1.0 + share * np.cumsum(reach)  # [longest]
        search = level.draft_call_ms.get(batch, 0.0) + level.draft_forward_ms(batch, context, 1)
        verify = level.verify.costs_for_counts(batch, context, longest + 1)[1:]  # [longest] 2..longest+1 tokens
        return tokens, verify + level.verify_overhead_ms.get(batch, 0.0) + search

    def prepare_budget(self, costs: CostModel, batch: int, context: int) -> None:
        """Nothing to prepare: the next step's level is chosen when it starts."""

    def draft_costs(self, costs: CostModel) -> CostModel:
        """The prices the step's Expand is measured against: its model level's (or lookup's)."""
        level = self.chosen or (self.plan[0] if self.plan else None)
        return costs.levels.get(level, costs) if level else costs

    # --- selection and learning -------------------------------------------------------------------------------

    def select(self, trees: list[TokenTree], costs: CostModel, batch: int, context: int,
               draft_ms: float = 0.0) -> list[TokenTree]:
        if self.policy.cast is None:
            # A fixed cascade: its values are acceptance estimates; CAST's rerank on them.
            return super().select(trees, self.draft_costs(costs), batch, context, draft_ms)
        if self.chosen is None:
            # Lookup alone verifies its whole chain. Cut by its learned acceptance, one early miss at depth 1 cut
            # it to the root, so nothing of it was verified, or learned, again: the `lookup` policy decoded plainly
            # for whole CPU runs (1.00 token a step, 0.9x `ar` on the edit set). The gate judges the whole chain
            # against plain decoding, per mode.
            return [tree.top_m(self.policy.verify_tokens) for tree in trees]
        return self.level_planner(self.chosen).select(trees, costs.levels[self.chosen], batch, context, draft_ms)

    def learn_layers(self, layer_utilities: list[list[float]]) -> None:
        if self.chosen is not None:
            self.level_planner(self.chosen).learn_layers(layer_utilities)

    def learn_step(self, batch: int, drafted: bool, verified: list[TokenTree], committed: list[int],
                   step_ms: float, one_off: bool, switch: bool = False) -> bool:
        switched = super().learn_step(batch, drafted, verified, committed, step_ms, one_off, switch)  # the gate
        if drafted and self.chosen is not None:  # the chosen level's value calibration
            self.level_planner(self.chosen).calibration.observe(verified, committed)
        return switched

    def learn_levels(self, expanded: list, verified: list[TokenTree], committed: list[list[int]]) -> None:
        """Each drafted sequence's verified tree, with the levels of its nodes (from its Expand's node_levels),
        and the tokens it committed: the per-level, per-depth acceptance."""
        for e, tree, tokens in zip(expanded, verified, committed):
            if e is None:
                continue
            by_path = node_levels_by_path(e.tree, [self.plan[i] if i >= 0 else None for i in e.node_levels])
            self.acceptance.observe(tree, [by_path.get(p) for p in tree_paths(tree)], tokens)


def tree_paths(tree: TokenTree) -> list[tuple[int, ...]]:
    """Each node's token path from the root (root: ())."""
    paths: list[tuple[int, ...]] = [()]
    for i in range(1, len(tree)):
        paths.append(paths[int(tree.parents[i])] + (int(tree.tokens[i]),))
    return paths


def node_levels_by_path(tree: TokenTree, levels: list[str | None]) -> dict[tuple[int, ...], str | None]:
    return dict(zip(tree_paths(tree), levels))


def arm_names(levels, copying: bool = False, finds: bool = True) -> tuple[str, ...]:
    """The gate's arms for these levels, in order of preference: each model level (lookup riding along), lookup
    alone, plain decoding; copying, lookup alone first. The first arm is learned first (draft_gate.py): copying,
    that is what mostly wins, and a model level judged writing (`borrow`) would otherwise run there until lookup
    alone is (the GPU's HumanEval pair: 14 small-draft steps at 0.59 tokens/ms against lookup alone's 1.32, 9 % of a
    short block). Where lookup finds nothing for the batch (`finds`), lookup alone is no arm: its step would be a
    plain one with an Expand call added, and its mode's winner on the CPU's edit set (lookup alone by 8 % over the
    small draft) ran one-token steps where the small draft commits five."""
    models = tuple(level for level in levels if level != LOOKUP)
    if LOOKUP not in levels or not finds:
        return models + (PLAIN,)
    return ((LOOKUP,) + models if copying else models + (LOOKUP,)) + (PLAIN,)


def match_runs(histories: Sequence[Sequence[int]]) -> list[int]:
    """Lookup's match run (cast_core/lookup.py match_run, up to COPYING; 0: nothing found) of each of the first
    COPYING_SAMPLE sequences (their tokens so far)."""
    return [match_run(np.fromiter(tokens, dtype=np.int64, count=len(tokens)), COPYING)
            for tokens in histories[:COPYING_SAMPLE]]


def copying(runs: list[int]) -> bool:
    """Whether at least half of the sequences are copying text that lookup finds."""
    return bool(runs) and 2 * sum(run >= COPYING for run in runs) >= len(runs)


def found_share(runs: list[int]) -> float:
    """The share of the sequences for which lookup finds a match (unknown histories count as found)."""
    return sum(run > 0 for run in runs) / len(runs) if runs else 1.0


def finds(runs: list[int]) -> bool:
    """Whether lookup finds a match for any of the sequences (unknown histories count as found)."""
    return not runs or any(runs)


def rate(price: tuple[float, float]) -> float:
    return price[0] / max(price[1], 1e-6)


def make_planner(policy: TreePolicy) -> Planner:
    return CascadePlanner(policy) if policy.levels else Planner(policy)
