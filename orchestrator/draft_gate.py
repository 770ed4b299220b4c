"""Whether a CAST step drafts at all: the depth rule at depth 0, decided from measured step efficiency.

CAST prices every layer of the tree against the verifier's step, but the first layer is never free: an Expand
call, its RPC and the verifier's larger forward are paid before any node is accepted. Where that outweighs what the
tree commits (a 2-core CPU at batch 8, a verifier that costs less than the draft's call on a GPU) the best tree is
the root alone, which is plain decoding. The gate measures both kinds of step at the live batch size, as tokens
committed per sequence per millisecond of step, and drafts only while drafting is ahead. It keeps exploring so
that either estimate can recover: a plain step now and then while drafting wins, a drafted step now and then
while it loses. Both kinds of step are exact (a root-only tree verifies the target's own token), so the gate
changes speed only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

WEIGHT = 0.2  # moving-average weight of one step
PROBE_WEIGHT = 1.0  # a probe of the losing kind replaces its estimate: probes are rare and the old one is stale
JUDGE_AFTER = 4  # drafted steps measured before drafting can lose at a batch size: they vary far more than plain
                # ones (the first after a prompt commit the least), and CAST's own estimates warm up meanwhile
SPIKE = 2.0  # one step counts as at most this many times the estimate: a GPU verifier captures a CUDA graph the
             # first time a shape comes up (contexts grow into new buckets mid-request), a 10-100x step


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
    explore_every: int = 32  # probes of the losing kind take about 1/explore_every of the time
    first_plain_after: int = 2  # drafted steps before plain decoding is first measured at a batch size
    max_period: int = 128  # a loser is probed at least this often: an early misjudgement must not stick
    drafted: dict[int, Efficiency] = field(default_factory=dict)  # per batch bucket
    plain: dict[int, Efficiency] = field(default_factory=dict)
    streak: dict[int, int] = field(default_factory=dict)  # steps of the winner since the other kind was last tried
    warmed: set[tuple[int, bool]] = field(default_factory=set)  # (bucket, drafted) whose first step was seen
    plain_measured: set[int] = field(default_factory=set)  # buckets where a plain step was measured, not expected

    def winner_drafts(self, batch: int) -> bool:
        batch = bucket(batch)
        drafted, plain = self.drafted.get(batch), self.plain.get(batch)
        if drafted is None or plain is None or drafted.samples < JUDGE_AFTER:
            return True
        return drafted.rate >= plain.rate

    def expect_plain(self, batch: int, step_ms: float) -> None:
        """Until a plain step is measured at this batch size, expect what the cost tables say one costs now (a
        one-token verify step, with the online corrections): the gate can judge drafting from its first measured
        steps. Plain steps are still measured early (`should_draft`): a table profiled while the machine was busy
        (a shared CPU) overprices them, and then drafting kept winning where plain decoding was twice as fast."""
        batch = bucket(batch)
        if batch not in self.plain_measured:
            self.plain[batch] = Efficiency(1.0, step_ms)

    def describe(self, batch: int) -> str:
        batch = bucket(batch)
        parts = [f"{name} {kind[batch].tokens:.2f} tokens / {kind[batch].millis:.1f} ms"
                 for name, kind in (("drafted", self.drafted), ("plain", self.plain)) if batch in kind]
        return ", ".join(parts)

    def should_draft(self, batch: int) -> bool:
        """Run the winning kind, and the other one after `explore_every` steps of the winner in a row."""
        batch = bucket(batch)
        if batch not in self.drafted:
            return True  # learn what drafting gives first
        drafts = self.winner_drafts(batch)
        if batch in self.plain_measured:
            # A probe of the losing kind costs its step time: probe a slow loser (a drafted step can cost five
            # plain ones) less often, so that probing stays near 1/explore_every of the time.
            winner, loser = (self.drafted, self.plain) if drafts else (self.plain, self.drafted)
            ratio = loser[batch].millis / max(winner[batch].millis, 1e-6)
            period = min(math.ceil(self.explore_every * max(1.0, ratio)), self.max_period)
        else:
            period = self.first_plain_after
        explore = self.streak.get(batch, 0) >= period
        return drafts != explore

    def observe(self, batch: int, drafted: bool, tokens_per_sequence: float, step_ms: float) -> None:
        batch = bucket(batch)
        kind = self.drafted if drafted else self.plain
        probe = drafted != self.winner_drafts(batch)
        if (batch, drafted) not in self.warmed:
            # The first step of each kind at a batch size pays one-off costs (a GPU verifier captures the CUDA
            # graphs of new shapes): it would misjudge that kind for a long time.
            self.warmed.add((batch, drafted))
            self.streak[batch] = 0 if probe else self.streak.get(batch, 0) + 1
            return
        if not drafted and batch not in self.plain_measured:  # the first measured plain step replaces the table's
            self.plain_measured.add(batch)
            kind[batch] = Efficiency(tokens_per_sequence, step_ms)
        elif batch in kind:
            kind[batch].add(tokens_per_sequence, step_ms, PROBE_WEIGHT if probe else WEIGHT)
        else:
            kind[batch] = Efficiency(tokens_per_sequence, step_ms)
        # Steps of the winning kind in a row since the other was last tried.
        self.streak[batch] = self.streak.get(batch, 0) + 1 if drafted == self.winner_drafts(batch) else 0


def bucket(batch: int) -> int:
    """Batch sizes share what they learn by power of two (5..8 -> 8): a batch that grows and shrinks by one
    sequence at a time would otherwise keep exploring."""
    return 1 << max(batch - 1, 0).bit_length()
