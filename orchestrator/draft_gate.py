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

Arms are noisy (lookup's steps commit 1.4 or 9 tokens as it misses or hits) and change (on a GPU, CAST's drafted
steps committed 2.26 tokens until its online calibration had warmed up, then ~5.5), so:
- an arm's estimate is a mean of its steps weighted by how recent they are: the latest MEMORY steps of the arm, and
  what it learned fades over STALE steps it did not run. A probe of an arm not run for long thus replaces its
  estimate, one of an arm run lately is blended in (its burst counting at least as much as what came before);
- a probe is a burst of steps in a row, as many as make their mean vary by about SPREAD (lookup: BURST, plain: one;
  a far loser: one): fresh, yet not one step's noise. The winner changes only between bursts, and, where both
  estimates are worth WELL / 2 steps or more, only by more than MARGIN standard errors;
- a loser is probed when its probes' cost so far (their time times how far behind it may be: its rate plus MARGIN
  standard errors, which grow as its estimate fades) would be 1/explore_every of the time since its last one,
  shared by the losers: a close loser is probed often, a far or slow one rarely, and each within explore_every *
  len(losers) * BURST of its own steps' time, so an early misjudgement does not stick. What starting a probe costs
  counts too (`charge_switch`: `cast`'s draft catching up on the tokens of the plain steps before it, a one-off
  step the arm is not judged on);
- an arm whose steps vary, that has fewer than WELL and that is cheap to start is probed soon while within REACH of
  the winner (at once where it may be ahead): drafting is judged on its warmed-up steps within a short cell;
- an arm that cannot win is not probed at all: where the policy says how many tokens a step of it commits at most
  (`ceilings`: a model level's tree is at most its depth deep), and that many in its step's time (measured, else
  priced) is behind the winner's measured rate. On the CPU's edit set, the sparse level's steps took 6 % of the
  cascade's time in copying mode (117 ms for at most 9 tokens, against lookup alone's 6.6 tokens in 24 ms).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

MEMORY = 16  # an arm's estimate weighs its latest ~MEMORY steps: lookup's 1.4-or-9 tokens average out, a drafted
             # arm warming up is followed within a few dozen steps
STALE = 64  # what an arm learned fades by 1/e over this many steps of the bucket it did not run: a probe after a
            # few hundred replaces the estimate, one after a few is blended in
BURST = 4  # steps of a probe at most: fresh, and one lookup step (1.4 or 9 tokens) does not decide ...
SPREAD = 0.2  # ... as many as make their mean vary by about this share of it (plain steps: one)
WELL = 16  # steps of an arm, ever, before it is well sampled (probed soon before); hysteresis between estimates
           # worth WELL / 2 steps or more now
SOON = 8  # winner steps between probes, and between the bursts of a loser not well sampled yet and within reach of
          # the winner ... (a cheap loser's probes may lose little, but in `cast` the drafted step after each is the
          # draft catching up, a one-off the gate charges to the probe: `charge_switch`)
REACH = 1.5  # ... that is, ahead were it this much faster (CAST's drafted steps commit over twice as many tokens
             # once its calibration has warmed up, over its first ~20 drafted steps)
MARGIN = 1.0  # standard errors of the two rates a challenger must lead a well-sampled winner by; a loser's rate
              # plus this many standard errors is what it may give (its probes' expected cost)
NOISE = 0.3  # until its steps show how much they vary, an arm's steps count as varying by this share of their tokens
FAR = 3  # a loser under 1/FAR of the winner's rate is far behind: its probe is one step (an 82 ms sparse step
         # against an 11 ms winner)
CLOSE = 0.125  # a loser as good as the winner is probed as one 1/8 behind: its probes lose nothing, but switch the
               # winner on noise
JUDGE_AFTER = 4  # drafted steps measured before drafting can lose at a batch size: they vary far more than plain
                # ones (the first after a prompt commit the least), and CAST's own estimates warm up meanwhile
BORROWED = 4  # steps a sibling gate's estimate is worth where it starts an arm (`borrow`)
SPIKE = 2.0  # one step counts as at most this many times the estimate: a GPU verifier captures a CUDA graph the
             # first time a shape comes up (contexts grow into new buckets mid-request), a 10-100x step
DRAFTED, PLAIN = "drafted", "plain"  # `cast`'s arms; a cascade's: its model levels, LOOKUP (alone) and PLAIN
LOOKUP = "lookup"


@dataclass
class Efficiency:
    """Weighted means of an arm's steps: tokens committed per sequence, the step's ms and the squared deviation of
    its tokens from what the rate gives for its ms; `weight`: how many steps they are worth now."""

    tokens: float
    millis: float
    weight: float = 1.0
    spread: float = 0.0
    samples: int = 1  # steps seen, unfaded

    def add(self, tokens: float, millis: float) -> None:
        millis = min(millis, SPIKE * self.millis)
        deviation = tokens - self.rate * millis
        self.samples += 1
        self.weight = min(self.weight + 1, MEMORY)
        share = 1 / self.weight  # the mean of the steps so far, then a moving average of the latest MEMORY
        self.tokens += share * (tokens - self.tokens)
        self.millis += share * (millis - self.millis)
        self.spread += share * (deviation ** 2 - self.spread)

    def fade(self, steps: int) -> None:
        self.weight *= math.exp(-steps / STALE)

    @property
    def rate(self) -> float:
        return self.tokens / max(self.millis, 1e-6)  # tokens per sequence per ms

    def deviation(self) -> float:
        """One step's standard deviation in tokens (NOISE counting as one step)."""
        return math.sqrt((self.spread * self.weight + (NOISE * self.tokens) ** 2) / (self.weight + 1))

    def error(self, idle: int = 0) -> float:
        """The rate's standard error, `idle` steps of the bucket after the arm last ran."""
        return self.deviation() / math.sqrt(self.weight * math.exp(-idle / STALE)) / max(self.millis, 1e-6)


@dataclass
class DraftGate:
    """Per batch bucket, the efficiency of each kind of step (arm) the policy can run; the best runs, the others
    are probed in bursts now and then. `cast`: drafting and plain decoding; a cascade: each model level (lookup's
    chain riding along), lookup alone and plain decoding (orchestrator/cascade.py)."""

    # In order of preference: ties go to the earlier arm, and an unjudged first arm that nothing prices wins (what
    # drafting gives is learned first).
    arms: tuple[str, ...] = (DRAFTED, PLAIN)
    explore_every: int = 32  # probes of the losers cost about 1/explore_every of the time (module docstring)
    first_plain_after: int = 2  # winner steps between probes while a loser is not judged yet (`cast`: before plain
                                # decoding is first measured at a batch size)
    measured: dict[int, dict[str, Efficiency]] = field(default_factory=dict)  # per batch bucket, per arm
    expected: dict[int, dict[str, Efficiency]] = field(default_factory=dict)  # priced, until the arm is judged
    leader: dict[int, str] = field(default_factory=dict)  # per bucket: the winner after its latest step
    burst: dict[int, list] = field(default_factory=dict)  # per bucket: [the loser probed, its steps left]
    streak: dict[int, int] = field(default_factory=dict)  # steps of the winner since a loser was last tried
    warmed: set[tuple[int, str]] = field(default_factory=set)  # (bucket, arm) whose first step was seen
    last_run: dict[tuple[int, str], int] = field(default_factory=dict)  # (bucket, arm): its latest step's number
    ran_at: dict[tuple[int, str], float] = field(default_factory=dict)  # (bucket, arm): `clock` at its latest step
    steps: dict[int, int] = field(default_factory=dict)  # per bucket: steps observed
    clock: dict[int, float] = field(default_factory=dict)  # per bucket: ms of the steps observed
    switch_ms: dict[tuple[int, str], float] = field(default_factory=dict)  # (bucket, arm): what starting a run of
                                                                            # it costs beyond its steps (`charge_switch`)
    ceilings: dict[str, float] = field(default_factory=dict)  # per arm: the most tokens per sequence one step of it
                                                              # commits, where the policy bounds it (`cannot_win`)

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
        """The arm with the most tokens per sequence per ms (of `arms`, the gate's by default); during a probe's
        burst the last winner, and where both are well sampled the last winner until another leads it by MARGIN
        standard errors."""
        batch, arms = bucket(batch), arms or self.arms
        rated = {arm: e for arm in arms if (e := self.estimate(batch, arm)) is not None}
        if arms[0] not in rated:
            return arms[0]  # learn what the first arm gives first (`cast`: drafting, which has no price)
        last = self.leader.get(batch)
        if last in rated and batch in self.burst:
            return last
        best = max(rated, key=lambda arm: rated[arm].rate)  # the first of equals
        if last in rated and last != best and min(self.worth(batch, best), self.worth(batch, last)) >= WELL / 2:
            lead = rated[best].rate - rated[last].rate
            if lead <= MARGIN * math.hypot(rated[best].error(self.idle(batch, best)),
                                           rated[last].error(self.idle(batch, last))):
                return last
        return best

    def expect(self, batch: int, arm: str, tokens: float, millis: float) -> None:
        """Until the arm is judged at this batch size, expect a step of it to commit `tokens` per sequence in
        `millis` (the cost tables' price): the gate can judge the others from their first measured steps."""
        self.expected.setdefault(bucket(batch), {})[arm] = Efficiency(tokens, millis)

    def reprice(self, batch: int, arm: str, tokens: float) -> None:
        """Where the policy knows what a step of `arm` commits better than the arm's own steps do, its estimate
        takes `tokens`; its steps still judge its time and how much it varies (lookup alone: orchestrator/cascade.py
        lookup_alone_price)."""
        measured = self.measured.get(bucket(batch), {}).get(arm)
        if measured is not None:
            measured.tokens = tokens

    def describe(self, batch: int, arms: Sequence[str] | None = None) -> str:
        batch, parts = bucket(batch), []
        for arm in arms or self.arms:
            e = self.estimate(batch, arm)
            if e is not None:
                priced = "" if self.judged(batch, arm) else " (priced)"
                parts.append(f"{arm} {e.tokens:.2f} tokens / {e.millis:.1f} ms{priced}")
        return ", ".join(parts)

    def choose(self, batch: int, arms: Sequence[str] | None = None) -> str:
        """Run the winner, or the loser in a burst, or one whose probe is due (the module docstring). Losers not
        judged yet come first, one step after every first_plain_after of the winner's."""
        batch, arms = bucket(batch), arms or self.arms
        winner = self.winner(batch, arms)
        if winner not in self.measured.get(batch, {}):
            return winner  # learn what the winner gives first
        # An arm that cannot win keeps its share of the probes' time unspent: the others are not probed more.
        shares = len(arms) - 1
        losers = [arm for arm in arms if arm != winner and not self.cannot_win(batch, arm, winner)]
        if not losers:
            return winner
        if batch in self.burst and self.burst[batch][0] in losers:
            return self.burst[batch][0]
        streak = self.streak.get(batch, 0)
        unjudged = [arm for arm in losers if not self.judged(batch, arm)]
        if unjudged:
            arm = min(unjudged, key=lambda arm: self.last_run.get((batch, arm), -1))
            return arm if streak >= self.first_plain_after else winner
        best, now = self.measured[batch][winner], self.clock.get(batch, 0.0)

        def due(arm: str) -> float:
            """The time since the arm's last step over its probe period."""
            e = self.measured[batch][arm]
            steps = self.burst_steps(batch, arm, winner)
            switch = self.switch_ms.get((batch, arm), 0.0)
            may_give = e.rate + MARGIN * min(e.error(self.idle(batch, arm)), e.rate)  # at most twice its rate
            behind = 1 - may_give / max(best.rate, 1e-9)
            # A probe costs its steps' lag behind the winner and what starting it costs (`charge_switch`).
            period = self.explore_every * shares * (steps * e.millis * max(behind, CLOSE) + switch)
            regret_due = (now - self.ran_at.get((batch, arm), 0.0)) / period
            if (e.samples < WELL and e.deviation() > SPREAD * e.tokens and REACH * may_give >= best.rate
                    and switch <= steps * e.millis):
                # Few of its steps, which vary, within reach and cheap to start: measured soon, at once where it
                # may be ahead. Sooner, never later, than its period says: capped at streak / SOON, lookup alone
                # misjudged on four missed chains lost every turn to plain decoding's short period (the CPU's
                # edit set: probed every ~100 steps).
                return math.inf if may_give >= best.rate else max(streak / SOON, regret_due)
            return regret_due

        loser = max(losers, key=due)
        if streak < (SOON if due(loser) < math.inf else self.first_plain_after) or due(loser) < 1:
            return winner
        steps = self.burst_steps(batch, loser, winner)
        self.burst[batch] = [loser, steps]
        e = self.measured[batch][loser]
        e.weight = min(e.weight, steps)  # the burst counts at least as much as what the arm learned before
        return loser

    def cannot_win(self, batch: int, arm: str, winner: str) -> bool:
        """Whether the arm's steps, committing the most they can (`ceilings`) in the time they take (measured, else
        priced), would still be behind the winner's measured rate."""
        ceiling, mine = self.ceilings.get(arm), self.latest(batch, arm)
        if ceiling is None or mine is None:
            return False
        return ceiling / max(mine.millis, 1e-6) < self.measured[batch][winner].rate

    def burst_steps(self, batch: int, arm: str, winner: str) -> int:
        """Steps enough that their mean varies by about SPREAD (up to BURST); one for a loser far behind."""
        e = self.measured[batch][arm]
        if FAR * e.rate < self.measured[batch][winner].rate:
            return 1
        return min(max(math.ceil((e.deviation() / max(e.tokens, 1e-9) / SPREAD) ** 2), 1), BURST)

    def worth(self, batch: int, arm: str) -> float:
        """How many steps the arm's estimate is worth now (a priced arm's: none)."""
        e = self.measured.get(batch, {}).get(arm)
        return e.weight * math.exp(-self.idle(batch, arm) / STALE) if self.judged(batch, arm) else 0.0

    def idle(self, batch: int, arm: str) -> int:
        """Steps of the bucket since the arm last ran."""
        return self.steps.get(batch, 0) - self.last_run.get((batch, arm), self.steps.get(batch, 0))

    def record(self, batch: int, arm: str, tokens_per_sequence: float, step_ms: float,
               arms: Sequence[str] | None = None) -> None:
        """A measured step of `arm`: tokens committed per sequence, the whole step's milliseconds."""
        batch, arms, key = bucket(batch), arms or self.arms, (bucket(batch), arm)
        probe = arm != self.winner(batch, arms)
        idle = self.idle(batch, arm)
        step = self.steps[batch] = self.steps.get(batch, 0) + 1
        self.clock[batch] = self.clock.get(batch, 0.0) + min(step_ms, SPIKE * self.current(batch, arm).millis)
        self.last_run[key], self.ran_at[key] = step, self.clock[batch]
        burst = self.burst.get(batch)
        if burst is not None:
            burst[1] -= 1
            if burst[0] != arm or burst[1] <= 0:
                del self.burst[batch]
        if key not in self.warmed:
            # The first step of each arm at a batch size pays one-off costs (a GPU verifier captures the CUDA
            # graphs of new shapes): it would misjudge that arm for a long time.
            self.warmed.add(key)
            self.streak[batch] = 0 if probe else self.streak.get(batch, 0) + 1
            return
        measured = self.measured.setdefault(batch, {})
        if arm not in measured:  # the first measured step replaces what the arm was priced at
            measured[arm] = Efficiency(tokens_per_sequence, step_ms)
        else:
            measured[arm].fade(max(idle - 1, 0))
            measured[arm].add(tokens_per_sequence, step_ms)
        self.leader[batch] = self.winner(batch, arms)
        # Steps of the winner in a row since a loser was last tried.
        self.streak[batch] = self.streak.get(batch, 0) + 1 if arm == self.leader[batch] else 0

    def charge_switch(self, batch: int, arm: str, step_ms: float) -> None:
        """A one-off step that started a run of `arm` and that the gate does not judge it on: `cast`'s draft catching
        up on the tokens of the plain steps before it (orchestrator/step_loop.py draft_catching_up). Its time beyond
        one of the arm's steps is what each probe of the arm costs besides its steps: at batch 32 on a 2-core CPU,
        ~500 ms against drafted steps of 60-80 ms, and uncounted, drafting 2 % behind plain decoding by its steps
        was probed in bursts that doubled a wave's time (reports/cast-vs-fixed/, CPU round 8)."""
        batch = bucket(batch)
        key = (batch, arm)
        extra = max(step_ms - self.current(batch, arm).millis, 0.0)
        old = self.switch_ms.get(key)
        self.switch_ms[key] = extra if old is None else old + 0.5 * (extra - old)
        self.clock[batch] = self.clock.get(batch, 0.0) + step_ms

    def borrow(self, sibling: DraftGate, batch: int) -> None:
        """Start the arms not judged here at this batch size from what `sibling` judged of them, worth at most
        BORROWED steps, and skip their one-off first step. A cascade's other mode (orchestrator/cascade.py): plain
        decoding and a model level cost the same in both modes, so a level far behind in one is probed in the other
        by regret, not measured eagerly (the GPU's sparse level: ten steps of 19 ms in a block of 1.4 s, half of
        them in the second mode); and an arm judged in both counts the steps of both towards WELL (what warms up,
        CAST's calibration of a level, is shared: a CPU's copying steps probed the small draft soon until their
        own 16, 17 % of a first block on the edit set). Lookup alone is not borrowed: whether its chains hit is
        what tells the modes apart."""
        batch = bucket(batch)
        mine = self.measured.setdefault(batch, {})
        for arm, e in sibling.measured.get(batch, {}).items():
            if arm == LOOKUP or not sibling.judged(batch, arm):
                continue
            if self.judged(batch, arm):  # a model level warms up in either mode: not probed soon for that here
                mine[arm].samples = max(mine[arm].samples, e.samples)
                continue
            mine[arm] = Efficiency(e.tokens, e.millis, min(e.weight, BORROWED), e.spread, e.samples)
            self.warmed.add((batch, arm))
            self.last_run[batch, arm] = self.steps.get(batch, 0)
            self.ran_at[batch, arm] = self.clock.get(batch, 0.0)

    def latest(self, batch: int, arm: str) -> Efficiency | None:
        """The arm's latest estimate, judged or not: measured, else priced (None: neither)."""
        return self.measured.get(batch, {}).get(arm) or self.expected.get(batch, {}).get(arm)

    def current(self, batch: int, arm: str) -> Efficiency:
        """`latest`, else one token in 1e9 ms (no estimate yet); a step's time is capped at SPIKE times its."""
        return self.latest(batch, arm) or Efficiency(1.0, 1e9)

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
