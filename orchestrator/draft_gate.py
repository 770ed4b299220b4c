"""Which kind of step a learning policy runs: the depth rule at depth 0, decided from measured step efficiency.

CAST prices every layer of the tree against the verifier's step, but the first layer is never free: an Expand
call, its RPC and the verifier's larger forward are paid before any node is accepted. Where that outweighs what the
tree commits (a 2-core CPU at batch 8, a verifier that costs less than the draft's call on a GPU) the best tree is
the root alone, which is plain decoding. The gate measures each kind of step (an arm) at the live batch size, as
tokens committed per sequence per millisecond of the whole step, and runs the one ahead. `cast` has two arms,
drafting and plain decoding. A cascade has one per model level it serves (lookup's chain riding along), lookup
alone and plain decoding: a model level that does not pay is dropped and lookup's nearly free chains kept (a sparse
level that cost more than the target it stands in for turned the whole cascade plain: reports/cascade/). Until an
arm's own steps judge it, it counts at what the cost tables price it at, where something does. Every arm is exact
(a root-only tree verifies the target's own token), so the gate changes speed only.

Steps are noisy (lookup's commit 1.4 or 9 tokens as it misses or hits: reports/cascade/, where a gate that let one
step replace an arm's estimate switched arms every few steps), so:
- an arm's rate is the ratio of decayed sums of its tokens and of its ms (about its last 20-40 steps; what a rarely
  run arm learned also fades over STALE steps of the others), and a probe adds to them as any step does;
- the winner changes only when a challenger leads it by MARGIN standard errors of the two rates (from how much each
  arm's steps vary): a wide margin while evidence is thin or steps vary much, almost none between steady arms;
- a probe far above what its arm's rate gives (SURPRISE) halves what its older steps weigh and is followed by CONFIRM
  probes soon, as is a loser whose rate tops the winner's: an arm that really changed wins within a few probes, and
  a lucky step is outweighed by the next ones.
Probes of the losers take about 1/explore_every of the step time whatever their number and cost: each loser's share
of it is a floor (so it is probed at least once per max_period of its own steps' time) plus a part by how close it
may come to the winner; none is probed more often than every explore_every steps of the winner, and none while
probes took more than their share so far. An 82 ms arm far behind a 12 ms winner is probed every ~10 s (every 42
steps before, ~15 % of the time). An arm not judged yet is measured soon after its first step, at most about 1/LEARN
of the time, unless its first steps make less than 1/FAR of the winner's rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

WEIGHT = 0.05  # per step of an arm, the decay of its sums: about its last 20-40 steps count
STALE = 512  # per step of the bucket, a further decay: a rarely probed arm's old steps fade over this many steps
NOISE = 0.2  # until its steps show how much they vary, an arm's steps count as varying by this share of their tokens
MARGIN = 1.0  # a challenger takes over when it leads by this many standard errors of the two rates
SURPRISE = 4.0  # a probe this many standard deviations of one step above what its arm's rate gives ...
CONFIRM = 2  # ... is followed by this many probes soon
FAR = 3  # an arm whose first steps make less than 1/FAR of the winner's rate is not measured further soon
LEARN = 4  # an arm measured soon takes at most about 1/LEARN of the time
JUDGE_AFTER = 4  # drafted steps measured before drafting can lose at a batch size: they vary far more than plain
                # ones (the first after a prompt commit the least), and CAST's own estimates warm up meanwhile
SPIKE = 2.0  # one step counts as at most this many times the estimate: a GPU verifier captures a CUDA graph the
             # first time a shape comes up (contexts grow into new buckets mid-request), a 10-100x step
DRAFTED, PLAIN = "drafted", "plain"  # `cast`'s arms; a cascade's: its model levels, LOOKUP (alone) and PLAIN
LOOKUP = "lookup"


@dataclass
class Efficiency:
    """Decayed sums of an arm's steps: their tokens committed per sequence, their ms, how many, and the squared
    deviations of their tokens from what the rate gives for their ms. The rate is a ratio of sums, so a step counts
    by its share of them, not by its own rate."""

    tokens: float
    millis: float
    steps: float = 1.0
    spread: float = 0.0
    samples: int = 1  # steps seen, undecayed

    def add(self, tokens: float, millis: float, keep: float = 1 - WEIGHT) -> None:
        millis = min(millis, SPIKE * self.step_ms)
        deviation = tokens - self.rate * millis
        self.samples += 1
        self.tokens = keep * self.tokens + tokens
        self.millis = keep * self.millis + millis
        self.steps = keep * self.steps + 1
        self.spread = keep * self.spread + deviation ** 2

    @property
    def rate(self) -> float:
        return self.tokens / max(self.millis, 1e-6)  # tokens per sequence per ms

    @property
    def step_tokens(self) -> float:
        return self.tokens / self.steps

    @property
    def step_ms(self) -> float:
        return self.millis / self.steps

    def deviation(self) -> float:
        """One step's standard deviation in tokens (a step varying by NOISE of its tokens counts as one more)."""
        return math.sqrt((self.spread + (NOISE * self.step_tokens) ** 2) / (self.steps + 1))

    def error(self) -> float:
        """The rate's standard error."""
        return self.deviation() * math.sqrt(self.steps) / max(self.millis, 1e-6)


@dataclass
class DraftGate:
    """Per batch bucket, the efficiency of each kind of step (arm) the policy can run; the best runs, the others
    are probed now and then. `cast`: drafting and plain decoding; a cascade: each model level (lookup's chain riding
    along), lookup alone and plain decoding (orchestrator/cascade.py)."""

    # In order of preference: ties go to the earlier arm, and an unjudged first arm that nothing prices wins (what
    # drafting gives is learned first).
    arms: tuple[str, ...] = (DRAFTED, PLAIN)
    explore_every: int = 32  # probes of the losers take about 1/explore_every of the time
    first_plain_after: int = 2  # winner steps between the probes of an arm measured soon (`cast`: before plain
                                # decoding is first measured at a batch size)
    max_period: int = 128  # each loser is probed at least once per this many of its own steps' time
    measured: dict[int, dict[str, Efficiency]] = field(default_factory=dict)  # per batch bucket, per arm
    expected: dict[int, dict[str, Efficiency]] = field(default_factory=dict)  # priced, until the arm is judged
    leader: dict[int, str] = field(default_factory=dict)  # per bucket: the winner after the latest step
    streak: dict[int, int] = field(default_factory=dict)  # steps of the winner since a loser was last tried
    warmed: set[tuple[int, str]] = field(default_factory=set)  # (bucket, arm) whose first step was seen
    confirm: dict[tuple[int, str], int] = field(default_factory=dict)  # (bucket, arm): probes due soon (SURPRISE)
    last_run: dict[tuple[int, str], int] = field(default_factory=dict)  # (bucket, arm): its latest step's number
    ran_at: dict[tuple[int, str], float] = field(default_factory=dict)  # (bucket, arm): `clock` after its latest step
    took: dict[tuple[int, str], float] = field(default_factory=dict)  # (bucket, arm): its latest step's ms
    steps: dict[int, int] = field(default_factory=dict)  # per bucket: steps observed
    clock: dict[int, float] = field(default_factory=dict)  # per bucket: ms of the steps observed
    probed: dict[int, float] = field(default_factory=dict)  # per bucket: ms of those that probed judged losers

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
        """The arm with the most tokens per sequence per ms (of `arms`, the gate's by default); the last winner
        stays while the best leads it by less than MARGIN standard errors."""
        batch, arms = bucket(batch), arms or self.arms
        rated = {arm: e for arm in arms if (e := self.estimate(batch, arm)) is not None}
        if arms[0] not in rated:
            return arms[0]  # learn what the first arm gives first (`cast`: drafting, which has no price)
        best = max(rated, key=lambda arm: rated[arm].rate)  # the first of equals
        last = self.leader.get(batch)
        if last in rated and last != best:
            lead = rated[best].rate - rated[last].rate
            if lead <= MARGIN * math.hypot(rated[best].error(), rated[last].error()):
                return last
        return best

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
                parts.append(f"{arm} {e.step_tokens:.2f} tokens / {e.step_ms:.1f} ms{priced}")
        return ", ".join(parts)

    def choose(self, batch: int, arms: Sequence[str] | None = None) -> str:
        """Run the winner, or a loser whose probe is due (the module docstring)."""
        batch, arms = bucket(batch), arms or self.arms
        winner = self.winner(batch, arms)
        losers = [arm for arm in arms if arm != winner]
        if winner not in self.measured.get(batch, {}) or not losers:
            return winner  # learn what the winner gives first
        now, best = self.clock.get(batch, 0.0), self.current(batch, winner)

        def soon(arm: str) -> bool:  # the module docstring
            e = self.measured[batch].get(arm)
            return (e is None or (batch, arm) in self.confirm or e.rate > best.rate
                    or not self.judged(batch, arm) and FAR * e.rate >= best.rate)

        learning = [arm for arm in losers if soon(arm) and now - self.ran_at.get((batch, arm), 0.0)
                    >= LEARN * self.took.get((batch, arm), 0.0)]
        if learning and self.streak.get(batch, 0) >= self.first_plain_after:
            return min(learning, key=lambda arm: self.last_run.get((batch, arm), -1))
        # The others: a probe costs the loser's step time. Each loser's share of 1/explore_every of the time is a
        # floor plus the rest by how close it may come to the winner (its rate plus MARGIN standard errors); it is
        # due once the time since its last step has earned its share, and explore_every of the winner's steps.
        close = {arm: min((e.rate + MARGIN * e.error()) / max(best.rate, 1e-9), 1.0) ** 2
                 for arm in losers if (e := self.current(batch, arm))}
        floor = min(self.explore_every / self.max_period, 1 / len(losers))
        rest = (1 - floor * len(losers)) / max(sum(close.values()), 1e-9)

        def due(arm: str) -> float:
            share = floor + rest * close[arm]
            period = self.explore_every * max(self.current(batch, arm).step_ms / share, best.step_ms)
            return (now - self.ran_at.get((batch, arm), 0.0)) / period

        loser = max(losers, key=due)
        within = self.probed.get(batch, 0.0) <= now / self.explore_every  # judged arms' probes, surprises included
        return loser if due(loser) >= 1 and within else winner

    def record(self, batch: int, arm: str, tokens_per_sequence: float, step_ms: float,
               arms: Sequence[str] | None = None) -> None:
        """A measured step of `arm`: tokens committed per sequence, the whole step's milliseconds."""
        batch, arms, key = bucket(batch), arms or self.arms, (bucket(batch), arm)
        probe = arm != self.winner(batch, arms)
        step = self.steps[batch] = self.steps.get(batch, 0) + 1
        gap = step - self.last_run.get(key, step - 1)
        # Probes are paced by the steps' time, a one-off step (a CUDA-graph capture) counting as SPIKE steps.
        clock = self.clock.get(batch, 0.0)
        self.clock[batch] = clock + min(step_ms, SPIKE * self.current(batch, arm).step_ms)
        self.last_run[key], self.ran_at[key], self.took[key] = step, self.clock[batch], step_ms
        if probe and self.judged(batch, arm):
            self.probed[batch] = self.probed.get(batch, 0.0) + self.clock[batch] - clock
        if key not in self.warmed:
            # The first step of each arm at a batch size pays one-off costs (a GPU verifier captures the CUDA
            # graphs of new shapes): it would misjudge that arm for a long time.
            self.warmed.add(key)
            self.streak[batch] = 0 if probe else self.streak.get(batch, 0) + 1
            return
        measured = self.measured.setdefault(batch, {})
        e = measured.get(arm)
        if e is None:  # the first measured step replaces what the arm was priced at
            measured[arm] = Efficiency(tokens_per_sequence, step_ms)
        else:
            keep = (1 - WEIGHT) * (1 - 1 / STALE) ** (gap - 1)
            if not probe:
                self.confirm.pop(key, None)  # it runs anyway
            elif self.judged(batch, arm):
                left = self.confirm.pop(key, 0) - 1
                if tokens_per_sequence - e.rate * min(step_ms, SPIKE * e.step_ms) > SURPRISE * e.deviation():
                    keep, left = keep / 2, CONFIRM
                if left > 0:
                    self.confirm[key] = left
            e.add(tokens_per_sequence, step_ms, keep)
        self.leader[batch] = self.winner(batch, arms)
        # Steps of the winner in a row since a loser was last tried.
        self.streak[batch] = self.streak.get(batch, 0) + 1 if arm == self.leader[batch] else 0

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
