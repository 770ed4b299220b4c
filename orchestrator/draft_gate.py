"""Which kind of step a learning policy runs: the depth rule at depth 0, decided from measured step efficiency.

CAST prices every layer of the tree against the verifier's step, but the first layer is never free: an Expand
call, its RPC and the verifier's larger forward are paid before any node is accepted. Where that outweighs what the
tree commits (a 2-core CPU at batch 8, a verifier that costs less than the draft's call on a GPU) the best tree is
the root alone, which is plain decoding. The gate measures each kind of step (an arm) at the live batch size, as
tokens committed per sequence per millisecond of the whole step, and runs the one ahead. `cast` has two arms,
drafting and plain decoding. A cascade has one per model level it serves (lookup's chain riding along), lookup
alone and plain decoding: a model level that does not pay is dropped and lookup's nearly free chains kept (a sparse
level that cost more than the target it stands in for turned the whole cascade plain: reports/cascade/). Until an
arm's own steps judge it, it counts at what the cost tables price it at, where something does. The gate keeps
exploring so that every estimate can recover: each loser now and then, in turn. Every arm is exact (a root-only
tree verifies the target's own token), so the gate changes speed only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

WEIGHT = 0.2  # moving-average weight of one step
PROBE_WEIGHT = 1.0  # a probe of the losing kind replaces its estimate: probes are rare and the old one is stale
JUDGE_AFTER = 4  # drafted steps measured before drafting can lose at a batch size: they vary far more than plain
                # ones (the first after a prompt commit the least), and CAST's own estimates warm up meanwhile
SPIKE = 2.0  # one step counts as at most this many times the estimate: a GPU verifier captures a CUDA graph the
             # first time a shape comes up (contexts grow into new buckets mid-request), a 10-100x step
DRAFTED, PLAIN = "drafted", "plain"  # `cast`'s arms; a cascade's: its model levels, LOOKUP (alone) and PLAIN
LOOKUP = "lookup"


@dataclass
class Efficiency:
    """Moving averages of tokens committed per sequence and of the step's milliseconds."""

    tokens: float
    millis: float
    samples: int = 1

    def add(self, tokens: float, millis: float, weight: float = WEIGHT) -> None:
        self.samples += 1
        weight = max(weight, 1 / self.samples)  # the first few count alike (their mean), not the first most
        self.tokens += weight * (tokens - self.tokens)
        self.millis += weight * (min(millis, SPIKE * self.millis) - self.millis)

    @property
    def rate(self) -> float:
        return self.tokens / max(self.millis, 1e-6)  # tokens per sequence per ms


@dataclass
class DraftGate:
    """Per batch bucket, the efficiency of each kind of step (arm) the policy can run; the best runs, the others
    are probed now and then. `cast`: drafting and plain decoding; a cascade: each model level (lookup's chain riding
    along), lookup alone and plain decoding (orchestrator/cascade.py)."""

    # In order of preference: ties go to the earlier arm, and an unjudged first arm that nothing prices wins (what
    # drafting gives is learned first).
    arms: tuple[str, ...] = (DRAFTED, PLAIN)
    explore_every: int = 32  # probes of the losers take about 1/explore_every of the time
    first_plain_after: int = 2  # winner steps between probes while a loser is not judged yet (`cast`: before plain
                                # decoding is first measured at a batch size)
    max_period: int = 128  # each loser is probed at least this often: an early misjudgement must not stick
    measured: dict[int, dict[str, Efficiency]] = field(default_factory=dict)  # per batch bucket, per arm
    expected: dict[int, dict[str, Efficiency]] = field(default_factory=dict)  # priced, until the arm is judged
    streak: dict[int, int] = field(default_factory=dict)  # steps of the winner since a loser was last tried
    warmed: set[tuple[int, str]] = field(default_factory=set)  # (bucket, arm) whose first step was seen
    last_run: dict[tuple[int, str], int] = field(default_factory=dict)  # (bucket, arm): its latest step's number
    steps: dict[int, int] = field(default_factory=dict)  # per bucket: steps observed

    # --- any arms ---------------------------------------------------------------------------------------------

    def judged(self, batch: int, arm: str) -> bool:
        """Whether the arm's own steps decide (a bucketed batch): one measured plain step, JUDGE_AFTER drafted."""
        measured = self.measured.get(batch, {}).get(arm)
        return measured is not None and measured.samples >= (1 if arm == PLAIN else JUDGE_AFTER)

    def estimate(self, batch: int, arm: str) -> Efficiency | None:
        """What the arm is judged on: its measured steps once judged, else what it was priced at (None: nothing)."""
        if self.judged(batch, arm):
            return self.measured[batch][arm]
        return self.expected.get(batch, {}).get(arm)

    def winner(self, batch: int, arms: Sequence[str] | None = None) -> str:
        """The arm with the most tokens per sequence per ms (of `arms`, the gate's by default)."""
        batch, arms = bucket(batch), arms or self.arms
        rated = [(arm, e.rate) for arm in arms if (e := self.estimate(batch, arm)) is not None]
        if not rated or rated[0][0] != arms[0]:
            return arms[0]  # learn what the first arm gives first (`cast`: drafting, which has no price)
        return max(rated, key=lambda rated_arm: rated_arm[1])[0]  # the first of equals

    def expect(self, batch: int, arm: str, tokens: float, millis: float) -> None:
        """Until the arm is judged at this batch size, expect a step of it to commit `tokens` per sequence in
        `millis` (the cost tables' price): the gate can judge the others from their first measured steps."""
        self.expected.setdefault(bucket(batch), {})[arm] = Efficiency(tokens, millis)

    def describe(self, batch: int, arms: Sequence[str] | None = None) -> str:
        batch, parts = bucket(batch), []
        for arm in arms or self.arms:
            e = self.estimate(batch, arm)
            if e is not None:
                priced = "" if self.judged(batch, arm) else " (priced)"
                parts.append(f"{arm} {e.tokens:.2f} tokens / {e.millis:.1f} ms{priced}")
        return ", ".join(parts)

    def choose(self, batch: int, arms: Sequence[str] | None = None) -> str:
        """Run the winner, and a loser after a period of the winner's steps in a row. Losers take turns (the
        least recently run first), those not judged yet before the others and more often."""
        batch, arms = bucket(batch), arms or self.arms
        winner = self.winner(batch, arms)
        losers = [arm for arm in arms if arm != winner]
        if winner not in self.measured.get(batch, {}) or not losers:
            return winner  # learn what the winner gives first
        unjudged = [arm for arm in losers if not self.judged(batch, arm)]
        loser = min(unjudged or losers, key=lambda arm: self.last_run.get((batch, arm), -1))
        if unjudged:
            period = self.first_plain_after
        else:
            # A probe costs the loser's step time: probe a slow loser (a drafted step can cost five plain ones) less
            # often, so that probing stays near 1/explore_every of the time; each loser within max_period.
            ratio = self.current(batch, loser).millis / max(self.current(batch, winner).millis, 1e-6)
            period = min(math.ceil(self.explore_every * max(1.0, ratio)), max(self.max_period // len(losers), 1))
        return loser if self.streak.get(batch, 0) >= period else winner

    def record(self, batch: int, arm: str, tokens_per_sequence: float, step_ms: float,
               arms: Sequence[str] | None = None) -> None:
        """A measured step of `arm`: tokens committed per sequence, the whole step's milliseconds."""
        batch, arms = bucket(batch), arms or self.arms
        probe = arm != self.winner(batch, arms)
        self.steps[batch] = self.steps.get(batch, 0) + 1
        self.last_run[(batch, arm)] = self.steps[batch]
        if (batch, arm) not in self.warmed:
            # The first step of each arm at a batch size pays one-off costs (a GPU verifier captures the CUDA
            # graphs of new shapes): it would misjudge that arm for a long time.
            self.warmed.add((batch, arm))
            self.streak[batch] = 0 if probe else self.streak.get(batch, 0) + 1
            return
        measured = self.measured.setdefault(batch, {})
        if arm not in measured:  # the first measured step replaces what the arm was priced at
            measured[arm] = Efficiency(tokens_per_sequence, step_ms)
        else:  # a probe of a judged loser replaces its estimate; until judged, an arm's steps count alike
            weight = PROBE_WEIGHT if probe and self.judged(batch, arm) else WEIGHT
            measured[arm].add(tokens_per_sequence, step_ms, weight)
        # Steps of the winner in a row since a loser was last tried.
        self.streak[batch] = self.streak.get(batch, 0) + 1 if arm == self.winner(batch, arms) else 0

    def current(self, batch: int, arm: str) -> Efficiency:
        """The arm's latest estimate, judged or not (probe periods scale with its step time)."""
        return self.measured.get(batch, {}).get(arm) or self.expected.get(batch, {}).get(arm) or Efficiency(1.0, 1.0)

    # --- `cast`'s two arms ----------------------------------------------------------------------------------

    def winner_drafts(self, batch: int) -> bool:
        return self.winner(batch) != PLAIN

    def expect_plain(self, batch: int, step_ms: float) -> None:
        """Until a plain step is measured at this batch size, expect what the cost tables say one costs now (a
        one-token verify step, with the online corrections): the gate can judge drafting from its first measured
        steps. Plain steps are still measured early (`choose`): a table profiled while the machine was busy
        (a shared CPU) overprices them, and then drafting kept winning where plain decoding was twice as fast."""
        self.expect(batch, PLAIN, 1.0, step_ms)

    def should_draft(self, batch: int) -> bool:
        return self.choose(batch) != PLAIN

    def observe(self, batch: int, drafted: bool, tokens_per_sequence: float, step_ms: float) -> None:
        self.record(batch, DRAFTED if drafted else PLAIN, tokens_per_sequence, step_ms)


def arm_label(arm: str, arms: Sequence[str]) -> str:
    """An arm as the log says it: `cast`'s in words, a cascade's model level with lookup where lookup rides along."""
    if arm in (DRAFTED, PLAIN):
        return {DRAFTED: "drafting", PLAIN: "plain decoding"}[arm]
    if arm == LOOKUP:
        return "lookup alone" if len(arms) > 2 else "lookup"
    return f"{arm} with lookup" if LOOKUP in arms else arm


def bucket(batch: int) -> int:
    """Batch sizes share what they learn by power of two (5..8 -> 8): a batch that grows and shrinks by one
    sequence at a time would otherwise keep exploring."""
    return 1 << max(batch - 1, 0).bit_length()
