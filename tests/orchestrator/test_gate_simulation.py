"""The draft gate against seeded random arms shaped like the H100 cascade run (reports/cascade/, batch 1 edit set):
lookup commits 1.4 or 9 tokens a step as it misses or hits, a model level ~6 tokens with noise. The gate must run
the best arm on most steps, keep its probes near 1/explore_every of the time, not switch on one step's noise, and
follow a real change."""

from __future__ import annotations

import random
from dataclasses import dataclass

from orchestrator.draft_gate import PLAIN, DraftGate

ARMS = ("sparse", "small", "lookup", PLAIN)  # arm_names(("lookup", "sparse", "small")): a cascade's order


@dataclass
class Arms:
    """Per arm, a step's (tokens per sequence, ms), each arm's drawn from its own stream of the seed (the k-th lookup
    step hits or misses whatever the gate ran before it); lookup hits with `hit_rate`."""

    seed: int
    hit_rate: float = 0.1
    sparse_ms: float = 82.0

    def __post_init__(self) -> None:
        self.rngs = {arm: random.Random(f"{self.seed}/{arm}") for arm in ARMS}

    def step(self, arm: str) -> tuple[float, float]:
        r = self.rngs[arm]
        if arm == "lookup":
            return (9.0 if r.random() < self.hit_rate else 1.4), r.uniform(4.5, 5.5)
        if arm == "small":
            return min(max(r.gauss(6.0, 1.5), 1.0), 8.0), r.uniform(9.0, 15.0)
        if arm == "sparse":
            return min(max(r.gauss(6.0, 1.5), 1.0), 8.0), self.sparse_ms * r.uniform(0.85, 1.15)
        return 1.0, r.uniform(2.8, 3.2)

    def rate(self, arm: str) -> float:
        """The arm's true tokens per ms."""
        return {"lookup": (9.0 * self.hit_rate + 1.4 * (1 - self.hit_rate)) / 5.0, "small": 6.0 / 12.0,
                "sparse": 6.0 / self.sparse_ms, PLAIN: 1.0 / 3.0}[arm]

    def best(self, arms) -> str:
        return max(arms, key=self.rate)


@dataclass
class Run:
    arms: list[str]      # each step's arm
    winners: list[str]   # the gate's winner before each step
    tokens: list[float]
    millis: list[float]

    def share(self, arm: str, start: int = 0, end: int | None = None) -> float:
        chosen = self.arms[start:end]
        return chosen.count(arm) / len(chosen)

    def probe_time(self, start: int = 0, end: int | None = None) -> float:
        """The share of step time spent on steps of an arm other than the gate's winner."""
        steps = list(zip(self.arms, self.winners, self.millis))[start:end]
        return sum(ms for arm, winner, ms in steps if arm != winner) / sum(ms for _, _, ms in steps)

    def switches(self, start: int = 0, end: int | None = None) -> int:
        w = self.winners[start:end]
        return sum(a != b for a, b in zip(w, w[1:]))

    def speed(self, start: int = 0, end: int | None = None) -> float:
        return sum(self.tokens[start:end]) / sum(self.millis[start:end])


def simulate(gate: DraftGate, world: Arms, steps: int, arms=ARMS, run: Run | None = None) -> Run:
    """Steps as a cascade's step loop runs them at batch 1: model levels and plain decoding priced (as the cost
    tables would), lookup alone not."""
    run = run or Run([], [], [], [])
    for _ in range(steps):
        for arm, price in (("small", (5.0, 10.0)), ("sparse", (5.0, 20.0)), (PLAIN, (1.0, 3.0))):
            if arm in arms:
                gate.expect(1, arm, *price)
        run.winners.append(gate.winner(1, arms))
        arm = gate.choose(1, arms)
        tokens, millis = world.step(arm)
        gate.record(1, arm, tokens, millis, arms)
        run.arms.append(arm)
        run.tokens.append(tokens)
        run.millis.append(millis)
    return run


SEEDS = range(5)
EDIT = ("edit set: small with lookup best, lookup alone 0.86x", lambda seed: Arms(seed, hit_rate=0.1), ARMS)
LOOKUP_BEST = ("lookup alone best (hits half the time)", lambda seed: Arms(seed, hit_rate=0.5), ARMS)
NO_SMALL = ("no small draft: lookup alone best", lambda seed: Arms(seed, hit_rate=0.3), ("sparse", "lookup", PLAIN))
SCENARIOS = [EDIT, LOOKUP_BEST, NO_SMALL]


def runs(scenarios=SCENARIOS, steps: int = 1000):
    for name, make, arms in scenarios:
        for seed in SEEDS:
            world = make(seed)
            yield f"{name}, seed {seed}", world, arms, simulate(DraftGate(arms=arms), world, steps, arms)


def test_the_best_arm_runs_despite_lookups_noise():
    """Main before this change, steps 200-1000 over 20 seeds: 0.66x the best arm's speed where lookup alone was best
    without a small draft (half the steps on it), 0.78x with one."""
    for name, world, arms, run in runs():
        best = world.best(arms)
        assert run.speed(40, 200) > 0.7 * world.rate(best), name
        assert run.speed(200) > 0.95 * world.rate(best), name
        # Lookup alone at 0.86x small's rate, but 1.4 or 9 tokens a step: the gate may try it for a while.
        assert run.share(best, 200) > (0.75 if name.startswith("edit") else 0.9), name


def test_probes_take_about_one_explore_every_of_the_time_whatever_the_losers_cost():
    """reports/cascade/: an 82 ms probe of the sparse arm every 42 steps of ~12 ms took ~15 % of the time."""
    sparse_15ms = ("sparse at batch 1's 15 ms", lambda seed: Arms(seed, hit_rate=0.1, sparse_ms=15.0), ARMS)
    for name, world, arms, run in runs(SCENARIOS + [sparse_15ms]):
        assert run.probe_time(200) < 1 / DraftGate().explore_every + 0.01, name


def test_a_slow_loser_far_behind_is_probed_once_per_max_period_of_its_own_steps():
    gate = DraftGate(arms=ARMS)
    run = simulate(gate, Arms(0), 4000)
    clock = [sum(run.millis[:i]) for i in range(len(run.millis))]
    sparse = [clock[i] for i, arm in enumerate(run.arms) if arm == "sparse" and i > 200]
    assert 2 <= len(sparse) and max(b - a for a, b in zip(sparse, sparse[1:])) < 1.1 * gate.max_period * 82.0
    assert sum(ms for arm, ms in zip(run.arms[200:], run.millis[200:]) if arm == "sparse") / sum(run.millis[200:]) \
        < 1.5 / gate.max_period


def test_one_steps_noise_does_not_switch_the_winner():
    """The H100 log: 'lookup alone now ... small with lookup now ... lookup alone now' within 0.2 s; main before this
    change switched 5-16 times in steps 200-1000 here (20 seeds' mean)."""
    for name, world, arms, run in runs():
        assert run.switches(100) <= 4, name


def test_a_cell_of_40_steps():
    """Each arm's first steps are measured (one-off costs, then JUDGE_AFTER steps) but an 82 ms arm far behind is
    left after its first: main before this change made 0.27-0.47x the best arm's speed here (20 seeds' means)."""
    for name, world, arms, run in runs(steps=40):
        assert run.speed() > 0.35 * world.rate(world.best(arms)), name


def test_the_gate_follows_lookup_that_stops_or_starts_hitting():
    for seed in SEEDS:
        world = Arms(seed, hit_rate=0.5)
        gate = DraftGate(arms=ARMS)
        run = simulate(gate, world, 300)
        world.hit_rate = 0.0  # lookup alone 0.28 tokens/ms: small with lookup (0.5) is best; the winner's steps show it
        run = simulate(gate, world, 300, run=run)
        assert run.share("small", 350) > 0.85, seed
        world.hit_rate = 0.5  # back to 1.04 tokens/ms: only probes can show it
        run = simulate(gate, world, 600, run=run)
        assert run.share("lookup", 900) > 0.85, seed


if __name__ == "__main__":  # the numbers the report quotes: python -m tests.orchestrator.test_gate_simulation
    import statistics

    def line(name: str, rows: list[tuple[float, ...]]) -> None:
        means = [statistics.mean(col) for col in zip(*rows)]
        print(f"{name:42s} x best {means[0]:.2f} (min {min(r[0] for r in rows):.2f}), steps on it {means[1]:.2f}, "
              f"probe time {means[2]:.3f}, switches {means[3]:.1f}")

    def window(world: Arms, arms, run: Run, start: int, end: int | None = None) -> tuple[float, ...]:
        best = world.best(arms)
        return (run.speed(start, end) / world.rate(best), run.share(best, start, end), run.probe_time(start, end),
                run.switches(start, end))

    sparse_15ms = ("sparse at batch 1's 15 ms", lambda seed: Arms(seed, hit_rate=0.1, sparse_ms=15.0), ARMS)
    for name, make, arms in SCENARIOS + [sparse_15ms]:
        cells, early, late = [], [], []
        for seed in range(20):
            world = make(seed)
            cells.append(window(world, arms, simulate(DraftGate(arms=arms), world, 40, arms), 0))
            world = make(seed)
            run = simulate(DraftGate(arms=arms), world, 1000, arms)
            early.append(window(world, arms, run, 40, 200))
            late.append(window(world, arms, run, 200))
        for label, rows in (("cell of 40", cells), ("steps 40-200", early), ("steps 200-1000", late)):
            line(f"{name[:28]}, {label}", rows)
    for label, before, after in (("lookup stops hitting", 0.5, 0.0), ("lookup starts hitting", 0.0, 0.5)):
        rows = []
        for seed in range(20):
            world, gate = Arms(seed, before), DraftGate(arms=ARMS)
            run = simulate(gate, world, 300)
            world.hit_rate = after
            rows.append(window(world, ARMS, simulate(gate, world, 300, run=run), 300))
        line(f"{label}: the 300 steps after", rows)
