from orchestrator.draft_gate import BURST, JUDGE_AFTER, PLAIN, DraftGate


def run(gate: DraftGate, steps: int, drafted_step: tuple[float, float], plain_step: tuple[float, float], batch: int = 8):
    """Drive the gate with fixed step outcomes (tokens per sequence, step ms); returns its choices."""
    choices = []
    for _ in range(steps):
        drafts = gate.should_draft(batch)
        choices.append(drafts)
        gate.observe(batch, drafts, *(drafted_step if drafts else plain_step))
    return choices


def speed(choices: list[bool], drafted_step: tuple[float, float], plain_step: tuple[float, float]) -> float:
    """Tokens per sequence per ms of the steps the gate chose."""
    steps = [drafted_step if drafts else plain_step for drafts in choices]
    return sum(tokens for tokens, _ in steps) / sum(ms for _, ms in steps)


def test_drafting_that_pays_stays_on_with_rare_plain_probes():
    choices = run(DraftGate(), 200, drafted_step=(5.0, 20.0), plain_step=(1.0, 10.0))  # 0.25 vs 0.1 tokens/ms
    assert choices[0] is True
    # Plain probes (one step each: plain steps do not vary) lose about 1/explore_every of the time.
    assert sum(choices) / len(choices) > 0.85
    assert speed(choices, (5.0, 20.0), (1.0, 10.0)) > 0.25 * (1 - 1.5 / DraftGate().explore_every)
    assert not all(choices)  # plain decoding was measured, so a change of costs would be seen


def test_drafting_that_does_not_pay_is_switched_off_but_still_probed():
    choices = run(DraftGate(), 200, drafted_step=(3.0, 40.0), plain_step=(1.0, 10.0))  # 0.075 vs 0.1 tokens/ms
    assert sum(choices[50:]) / 150 < 0.06
    assert any(choices[50:])  # drafting is retried, so it can win back


def test_batch_sizes_are_judged_separately():
    gate = DraftGate()
    run(gate, 100, drafted_step=(3.0, 40.0), plain_step=(1.0, 10.0), batch=8)
    run(gate, 100, drafted_step=(5.0, 20.0), plain_step=(1.0, 10.0), batch=1)
    assert not gate.winner_drafts(8) and gate.winner_drafts(1)
    assert not gate.winner_drafts(5)  # 5..8 share what 8 learned


def test_the_gate_follows_a_change_in_costs():
    gate = DraftGate()
    run(gate, 100, drafted_step=(3.0, 40.0), plain_step=(1.0, 10.0))
    assert not gate.winner_drafts(8)
    choices = run(gate, 400, drafted_step=(5.0, 15.0), plain_step=(1.0, 10.0))  # drafting became cheap
    assert gate.winner_drafts(8) and sum(choices[200:]) / 200 > 0.9


def test_a_slow_first_step_does_not_decide():
    """The first drafted step at a batch size pays for CUDA-graph captures (seen at 10x a normal step on an H100)."""
    gate = DraftGate()
    choices = []
    for i in range(300):
        drafts = gate.should_draft(8)
        choices.append(drafts)
        slow = 10.0 if i == 0 else 1.0
        gate.observe(8, drafts, *((5.0, 20.0 * slow) if drafts else (1.0, 10.0)))
    assert gate.winner_drafts(8) and speed(choices[20:], (5.0, 20.0), (1.0, 10.0)) > 0.24


def test_a_misjudged_loser_is_probed_again_and_wins_back():
    """Drafting looked terrible at first (200 ms a step, far behind): its probes, one step each, lose about
    1/explore_every of the time, so the next comes after ~explore_every * 200 ms * how far behind it was (16
    plain steps of 10 ms per probe); one shows it, as what the gate learned of it long ago has faded (STALE)."""
    gate = DraftGate()
    run(gate, 50, drafted_step=(5.0, 200.0), plain_step=(1.0, 10.0))  # drafting looked terrible at first
    choices = run(gate, gate.explore_every * 20 + 60, drafted_step=(5.0, 20.0), plain_step=(1.0, 10.0))
    assert gate.winner_drafts(8) and choices[-1]


def test_an_expected_plain_cost_decides_from_the_first_measured_drafted_steps():
    gate = DraftGate()
    gate.expect_plain(8, 10.0)  # what the verifier's table says a one-token step costs
    choices = run(gate, 16, drafted_step=(3.0, 40.0), plain_step=(1.0, 10.0))
    # Drafting first, plain steps measured early, then plain: drafting loses (0.075 vs 0.1 tokens/ms).
    assert choices[0] and sum(choices[:8]) <= 1 + JUDGE_AFTER and not any(choices[8:])


def test_a_plain_cost_overpriced_by_the_table_is_corrected_by_measuring_plain_steps():
    """A table profiled on a busy machine says a plain step costs 100 ms; it costs 10: plain decoding must win."""
    gate = DraftGate()
    choices = []
    for _ in range(40):
        gate.expect_plain(8, 100.0)
        drafts = gate.should_draft(8)
        choices.append(drafts)
        gate.observe(8, drafts, *((3.0, 40.0) if drafts else (1.0, 10.0)))
    assert sum(choices[10:]) <= 2  # plain after a few steps, drafting probed now and then


def test_a_poor_first_drafted_step_does_not_turn_drafting_off():
    """The first steps after a prompt commit the fewest tokens: drafting is judged on a few, not on one."""
    gate = DraftGate()
    gate.expect_plain(8, 10.0)
    outcomes = iter([(1.0, 30.0), (1.0, 30.0)] + [(5.0, 30.0)] * 100)  # warm-up, one poor step, then 0.17 tokens/ms
    choices = []
    for _ in range(60):
        drafts = gate.should_draft(8)
        choices.append(drafts)
        gate.observe(8, drafts, *(next(outcomes) if drafts else (1.0, 10.0)))
    assert sum(choices) >= 48  # drafting wins (0.17 vs 0.1 tokens/ms) after one poor measured step
    assert gate.winner_drafts(8)


def test_one_off_spikes_do_not_turn_drafting_off():
    """Every 20th drafted step pays a CUDA-graph capture (50x): drafting still wins, as its typical steps do."""
    gate = DraftGate()
    choices = []
    for i in range(400):
        drafts = gate.should_draft(1)
        choices.append(drafts)
        spike = 50.0 if i % 20 == 5 else 1.0
        gate.observe(1, drafts, *((5.0, 20.0 * spike) if drafts else (1.0, 10.0)))
    assert gate.winner_drafts(1) and sum(choices) / len(choices) > 0.85


def tokens_per_ms(choices: list[str], outcomes: dict[str, tuple[float, float]]) -> float:
    return sum(outcomes[arm][0] for arm in choices) / sum(outcomes[arm][1] for arm in choices)


def run_arms(gate: DraftGate, steps: int, outcomes: dict[str, tuple[float, float]], batch: int = 1) -> list[str]:
    """Drive a gate of named arms with fixed step outcomes per arm; returns its choices."""
    choices = []
    for _ in range(steps):
        arm = gate.choose(batch)
        choices.append(arm)
        gate.record(batch, arm, *outcomes[arm])
    return choices


def test_of_several_arms_the_best_measured_runs_and_each_loser_is_probed_within_a_bounded_time():
    gate = DraftGate(arms=("sparse", "lookup", PLAIN))
    gate.expect(1, "sparse", 3.0, 12.0)  # priced best (0.25 tokens/ms); measured 0.1
    gate.expect(1, PLAIN, 1.0, 9.0)
    choices = run_arms(gate, 600, {"sparse": (3.0, 30.0), "lookup": (2.5, 10.0), PLAIN: (1.0, 9.0)})
    assert choices[0] == "sparse"  # the price decides until measured
    assert gate.winner(1) == "lookup" and choices[100:].count("lookup") / 500 > 0.9
    clock = [0.0]
    for arm in choices:
        clock.append(clock[-1] + {"sparse": 30.0, "lookup": 10.0, PLAIN: 9.0}[arm])
    for arm, ms in (("sparse", 30.0), (PLAIN, 9.0)):  # each loser within explore_every * losers * BURST of its ms
        runs = [clock[i] for i, c in enumerate(choices) if c == arm and i > 100]
        assert len(runs) >= 2 and max(b - a for a, b in zip(runs, runs[1:])) <= gate.explore_every * 2 * BURST * ms


def test_an_arm_not_judged_yet_counts_at_its_price_and_is_measured_early():
    gate = DraftGate(arms=("sparse", "lookup", PLAIN))
    gate.expect(1, "sparse", 3.0, 12.0)
    gate.expect(1, PLAIN, 1.0, 9.0)
    choices = run_arms(gate, 40, {"sparse": (3.0, 12.0), "lookup": (1.0, 9.5), PLAIN: (1.0, 9.0)})
    assert gate.judged(1, "lookup") and gate.judged(1, PLAIN)  # lookup has no price: measured, not guessed
    assert choices.count("lookup") == 1 + JUDGE_AFTER  # its warm-up step, then judged on its own steps
    assert gate.winner(1) == "sparse" and choices[-10:] == ["sparse"] * 10


def test_a_draft_catching_up_is_not_a_drafted_steps_cost():
    """A prompt or the tokens of plain steps since the draft's last call cost once (on a 2-core CPU a probe after 100
    plain steps at batch 8 took 60-110 ms): the gate must not learn a drafted step's cost from them."""
    from types import SimpleNamespace

    from orchestrator.policies import POLICIES
    from orchestrator.step_loop import draft_catching_up

    cast = POLICIES["cast"]

    def sequence(tokens: int, draft_seen: int) -> SimpleNamespace:
        return SimpleNamespace(tokens=list(range(tokens)), draft_seen=draft_seen, policy=cast)

    one_step = cast.max_depth + 1
    assert not draft_catching_up([sequence(100, 100 - one_step), sequence(50, 49)])  # steady drafting
    assert draft_catching_up([sequence(100, 100 - one_step), sequence(40, 0)])  # a new prompt joins
    assert draft_catching_up([sequence(300, 200)])  # back from 100 plain steps


def test_what_starting_to_draft_costs_is_charged_to_the_probes_of_drafting():
    """At batch 32 on a 2-core CPU drafting was 2 % behind plain decoding by its steps, but each probe of it after a
    run of plain steps first had the draft catch up on every sequence's tokens since (~500 ms, a one-off step the gate
    does not judge drafting on). Uncharged, probes came in bursts that doubled a wave's time; charged, they are rare,
    and drafting is still probed."""
    drafted, plain, catch_up = (2.55, 72.3), (1.0, 27.7), 72.3 + 500.0

    def wasted_share(charge: bool) -> tuple[float, int]:
        gate, batch, last, spent, probes = DraftGate(), 32, True, 0.0, 0
        gate.observe(batch, False, *plain)
        for _ in range(4 * JUDGE_AFTER):  # drafting judged first (the first arm is learned first)
            gate.observe(batch, True, *drafted)
        for _ in range(2000):
            drafts = gate.should_draft(batch)
            if drafts and not last:  # a switch: the draft catches up first
                probes += 1
                spent += catch_up
                if charge:
                    gate.charge_switch(batch, "drafted", catch_up)
            else:
                tokens, millis = drafted if drafts else plain
                spent += millis
                gate.observe(batch, drafts, tokens, millis)
            last = drafts
        return spent / (2000 * plain[1]) - 1, probes

    uncharged, charged = wasted_share(False), wasted_share(True)
    assert charged[0] < 0.10 and charged[1] >= 2, charged  # drafting is still probed now and then
    assert uncharged[0] > 2 * charged[0], (uncharged, charged)


def test_an_arm_that_cannot_win_even_committing_its_most_is_not_probed_until_the_winner_slows():
    """The CPU's edit set (reports/cascade/): in copying mode the sparse level's step took 117 ms for at most 9 tokens
    (0.077 tokens/ms) against lookup alone's 6.6 tokens in 24 ms (0.27); its probes took 6 % of the cascade's time."""
    outcomes = {"lookup": (6.6, 24.0), "sparse": (5.5, 117.0), PLAIN: (1.0, 14.0)}
    bounded = DraftGate(arms=("lookup", "sparse", PLAIN), ceilings={"sparse": 9.0})
    unbounded = DraftGate(arms=("lookup", "sparse", PLAIN))
    for gate in (bounded, unbounded):
        gate.expect(1, "sparse", 3.0, 110.0)
        gate.expect(1, PLAIN, 1.0, 14.0)
    unbounded_choices = run_arms(unbounded, 600, outcomes)
    assert unbounded_choices.count("sparse") >= 1 + JUDGE_AFTER  # measured, then probed
    choices = run_arms(bounded, 600, outcomes)
    assert choices.count("sparse") == 0
    # Plain decoding is probed no more often for it: the probes' time shrinks by the sparse level's share.
    assert choices.count(PLAIN) <= unbounded_choices.count(PLAIN) + 1
    assert tokens_per_ms(choices, outcomes) > 1.02 * tokens_per_ms(unbounded_choices, outcomes)
    # Lookup stops hitting (1.2 tokens in 24 ms: 0.05 tokens/ms): at most 9 in 117 ms may now win, and it does.
    slowed = {"lookup": (1.2, 24.0), "sparse": (8.0, 117.0), PLAIN: (1.0, 17.0)}  # 0.05, 0.068, 0.059 tokens/ms
    choices = run_arms(bounded, 400, slowed)
    assert bounded.winner(1) == "sparse" and choices[-100:].count("sparse") > 80


def test_the_winner_of_steps_without_an_arm_does_not_hold_off_that_arm_where_it_runs():
    """A cascade's writing steps (reports/cascade/, CPU edit set): where lookup finds nothing, lookup alone is no arm
    and the small draft wins against plain decoding; where it finds a chain, lookup alone led. One incumbent for
    both let the small draft's wins in the first hold lookup alone off in the second (its lead within the margin
    of its noisy 1-or-9-token steps): writing, the small draft ran 109 steps to lookup alone's 16 (0.17 against
    0.48 tokens/ms)."""
    found, nothing = ("small", "lookup", PLAIN), ("small", PLAIN)
    gate = DraftGate(arms=found)
    for i in range(20):
        gate.record(1, "lookup", 9.0 if i % 2 else 1.0, 14.8, found)  # 5 tokens, 0.34 tokens/ms
    for _ in range(20):
        gate.record(1, "small", 4.6, 15.3, found)  # 0.30 tokens/ms: behind, within the margin
    gate.record(1, PLAIN, 1.0, 8.5, found)
    assert gate.winner(1, found) == "lookup"
    gate.record(1, "small", 4.6, 15.3, nothing)  # nothing found: the small draft wins there
    assert gate.winner(1, nothing) == "small"
    assert gate.winner(1, found) == "lookup"  # still, where lookup alone runs


def test_a_loser_probed_soon_is_never_probed_later_than_its_period_says():
    """The CPU's edit set (reports/cascade/): lookup alone, judged on four missed chains, few steps that vary and
    within reach of the small draft, was to be probed "soon", after SOON steps of the winner; but that rule capped
    how due it was, and plain decoding, whose cheap probes fall due every few steps, won every turn: lookup alone
    went unprobed for ~180 steps."""
    outcomes = {"small": (5.1, 30.0), "lookup": (1.6, 14.8), PLAIN: (1.0, 8.5)}  # 0.17, 0.108, 0.118 tokens/ms
    gate = DraftGate(arms=("small", "lookup", PLAIN))
    for i in range(1 + JUDGE_AFTER):  # its first step, then judged on four missed chains
        gate.record(1, "lookup", 1.0 if i % 2 else 2.2, 14.8)
    for arm in ["small"] * 20 + [PLAIN] * 3:
        gate.record(1, arm, *outcomes[arm])
    choices = []
    for i in range(400):
        arm = gate.choose(1)
        choices.append(arm)
        tokens, millis = outcomes[arm]
        if arm == "lookup":
            tokens = 1.0 if i % 2 else 2.2  # its chains miss at the first or the second token
        gate.record(1, arm, tokens, millis)
    # Its regret period (draft_gate.py choose: ~32 x 2 losers x 4 steps x 14.8 ms x how far behind) is ~60 steps
    # of ~28 ms here; capped, it was probed after 95 steps, then every ~140.
    assert "lookup" in choices[:60] and choices.count("lookup") >= 5 * BURST
