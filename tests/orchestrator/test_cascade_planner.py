"""The cascade planner without services: what it learns per level and tree depth, and which level it drafts with."""

from __future__ import annotations

from cast_core.cost_table import CostTable
from cast_core.lookup import chain_values
from cast_core.tree import TokenTree
from orchestrator.cascade import PRIOR_RATE, CascadePlanner, LevelAcceptance
from orchestrator.costs import CostModel
from orchestrator.policies import POLICIES


def test_acceptance_is_learned_per_level_and_depth():
    # root -> 7 (lookup) -> 8 (lookup); root -> 3 (sparse) -> 4 (sparse)
    tree = TokenTree.from_lists([5, 7, 8, 3, 4], [-1, 0, 1, 0, 3], [0, 1, 2, 1, 2], [1, .9, .8, .5, .4])
    levels = [None, "lookup", "lookup", "sparse", "sparse"]
    a = LevelAcceptance()
    for _ in range(40):
        a.count_step({"lookup", "sparse"})
        a.observe(tree, levels, [7, 8, 1])  # lookup's chain accepted whole, then a bonus token
    lookup, sparse = a.rates("lookup", 3), a.rates("sparse", 3)
    assert lookup[0] > 0.9 and lookup[1] > 0.9
    assert lookup[2] == PRIOR_RATE  # nothing proposed at depth 3: the prior
    assert sparse[0] < 0.1  # offered at depth 1 every step, never accepted
    assert sparse[1] == PRIOR_RATE  # never offered at depth 2 (its parent was never accepted)
    assert a.expected_tokens("lookup", 2) > 1.7 > a.expected_tokens("sparse", 2)


def table(lam: float, delta: float, model: str) -> CostTable:
    return CostTable.linear(lam, delta, batch_sizes=(1, 8), context_buckets=(128, 2048),
                            token_counts=(1, 8, 64), device="cpu", model_id=model, dtype="float32")


def costs_with_levels(small_ms: float, sparse_ms: float) -> CostModel:
    verify = table(0.05, 10.0, "target")
    costs = CostModel.from_tables(verify, table(0.01, small_ms, "small"))
    costs.levels = {"small": CostModel.from_tables(verify, table(0.01, small_ms, "small")),
                    "sparse": CostModel.from_tables(verify, table(0.01, sparse_ms, "sparse")),
                    "lookup": CostModel.from_tables(verify, table(0.0, 0.01, "lookup"))}
    return costs


def test_before_steps_are_measured_the_level_with_more_expected_tokens_per_millisecond_drafts():
    """DyTC's price (acceptance per level and depth against each level's cost table): the gate's prior."""
    planner = CascadePlanner(POLICIES["cascade"])
    costs = costs_with_levels(small_ms=0.1, sparse_ms=0.5)  # both priced above plain decoding's 0.1 tokens/ms
    assert planner.drafts(costs, 1, 100)
    budget = planner.budget(costs, 1, 100)
    assert [level.level for level in budget.levels] == ["lookup", "small"]  # equal priors: the cheaper level
    assert budget.levels[1].budget.HasField("cast") and budget.levels[0].acceptance
    # Sparse's chains of 8 are accepted whole, small's first token never: sparse is priced best despite its cost.
    chain = TokenTree.from_lists(list(range(9)), list(range(-1, 8)), list(range(9)), [1.0] * 9)
    choices = []
    for _ in range(32):
        planner.arm = None  # a budget priced outside a step: the price alone decides
        chosen = [level.level for level in planner.budget(costs, 1, 100).levels][-1]
        choices.append(chosen)
        levels = [None] + [chosen] * 8
        planner.acceptance.observe(chain, levels, list(range(1, 10)) if chosen == "sparse" else [99])
    assert choices[-16:] == ["sparse"] * 16
    small, sparse = (planner.step_price(level, costs, 1, 100) for level in ("small", "sparse"))
    assert sparse[0] / sparse[1] > small[0] / small[1]


ROOT = TokenTree.from_lists([5], [-1], [0], [1.0])


def drive(planner: CascadePlanner, costs: CostModel, steps: int, outcomes: dict[str, tuple[float, float]],
          batch: int = 1) -> tuple[list[str], int]:
    """Steps as the step loop runs them, each arm's step committing and taking what `outcomes` says (tokens per
    sequence, ms). Returns each step's arm (its Expand's last level: a model level, or lookup alone; else plain)
    and how many times the gate switched."""
    arms, switches = [], 0
    for _ in range(steps):
        drafts = planner.drafts(costs, batch, 100)
        arm = [level.level for level in planner.budget(costs, batch, 100).levels][-1] if drafts else "plain"
        arms.append(arm)
        tokens, millis = outcomes[arm]
        switches += planner.learn_step(batch, drafts, [ROOT] * batch, [tokens] * batch, millis, False)
    return arms, switches


def sparse_and_lookup() -> CostModel:
    """A target with no draft model: sparse and lookup, sparse priced well worth drafting."""
    costs = costs_with_levels(small_ms=0.1, sparse_ms=0.5)
    del costs.levels["small"]
    return costs


def test_a_model_level_slower_per_token_than_lookup_alone_is_dropped_and_lookup_kept():
    """reports/cascade/ (H100, edit prompts): sparse + lookup 8.6 ms a step against 2.4 plain; the gate judged
    drafting as a whole and decoded plainly, losing lookup's chains (630 tok/s against lookup alone's 722)."""
    planner = CascadePlanner(POLICIES["cascade"])
    outcomes = {"sparse": (3.0, 35.0), "lookup": (2.5, 10.5), "plain": (1.0, 10.0)}  # 0.086, 0.24, 0.1 tokens/ms
    arms, switches = drive(planner, sparse_and_lookup(), 400, outcomes)
    assert arms[0] == "sparse"  # priced best until measured
    assert arms[100:].count("lookup") / 300 > 0.9 and arms[100:].count("plain") < 10
    assert "sparse" in arms[-150:] and "plain" in arms[-150:]  # both still probed
    assert planner.gate.winner(1, planner.arms) == "lookup" and 1 <= switches <= 6


def test_where_plain_decoding_beats_every_level_it_runs_and_the_levels_are_probed():
    planner = CascadePlanner(POLICIES["cascade"])
    outcomes = {"sparse": (3.0, 40.0), "lookup": (1.2, 12.0), "plain": (1.0, 5.0)}  # 0.075, 0.1, 0.2 tokens/ms
    arms, _ = drive(planner, sparse_and_lookup(), 400, outcomes)
    assert arms[100:].count("plain") / 300 > 0.9
    assert "sparse" in arms[-150:] and "lookup" in arms[-150:]


def test_a_level_that_recovers_drafts_again():
    planner = CascadePlanner(POLICIES["cascade"])
    costs = sparse_and_lookup()
    drive(planner, costs, 200, {"sparse": (3.0, 35.0), "lookup": (2.5, 10.5), "plain": (1.0, 10.0)})
    assert planner.gate.winner(1, planner.arms) == "lookup"
    # The sparse level got cheap (e.g. its CUDA graphs): 6 tokens in 15 ms, 0.4 tokens/ms against lookup's 0.24.
    arms, _ = drive(planner, costs, 400, {"sparse": (6.0, 15.0), "lookup": (2.5, 10.5), "plain": (1.0, 10.0)})
    assert planner.gate.winner(1, planner.arms) == "sparse" and arms[-100:].count("sparse") > 90


def test_the_model_level_that_measures_best_drafts_not_the_one_priced_best():
    planner = CascadePlanner(POLICIES["cascade"])
    costs = costs_with_levels(small_ms=0.1, sparse_ms=0.5)  # small priced best
    outcomes = {"small": (2.0, 30.0), "sparse": (4.0, 20.0), "lookup": (1.5, 10.2), "plain": (1.0, 10.0)}
    arms, _ = drive(planner, costs, 400, outcomes)
    # Lookup alone (0.74x) and plain decoding (0.5x) are close enough to be probed now and then, together losing
    # about 1/explore_every of the time (orchestrator/draft_gate.py).
    assert arms[0] == "small" and arms[100:].count("sparse") / 300 > 0.8
    assert {"small", "lookup", "plain"} <= set(arms[-200:])  # every loser probed


def test_levels_priced_below_plain_decoding_are_still_measured_and_draft_where_they_pay():
    """A table that overprices a level (profiled on a busy machine) must not keep the cascade plain."""
    planner = CascadePlanner(POLICIES["cascade"])
    costs = costs_with_levels(small_ms=1.0, sparse_ms=5.0)  # every model level priced below plain's 0.1 tokens/ms
    outcomes = {"small": (2.0, 30.0), "sparse": (5.0, 20.0), "lookup": (1.5, 10.2), "plain": (1.0, 10.0)}
    arms, _ = drive(planner, costs, 200, outcomes)
    assert arms[0] == "plain" and arms[60:].count("sparse") / 140 > 0.8  # the closer losers probed, as above


def test_batch_sizes_choose_their_arms_separately():
    planner = CascadePlanner(POLICIES["cascade"])
    costs = sparse_and_lookup()
    drive(planner, costs, 200, {"sparse": (3.0, 35.0), "lookup": (2.5, 10.5), "plain": (1.0, 10.0)}, batch=1)
    drive(planner, costs, 200, {"sparse": (3.0, 35.0), "lookup": (1.1, 10.5), "plain": (1.0, 5.0)}, batch=8)
    assert planner.gate.winner(1, planner.arms) == "lookup" and planner.gate.winner(8, planner.arms) == "plain"


def test_a_level_alone_and_a_replica_without_it():
    costs = costs_with_levels(1.0, 5.0)
    lookup = CascadePlanner(POLICIES["lookup"])
    assert [level.level for level in lookup.budget(costs, 1, 100).levels] == ["lookup"]
    del costs.levels["sparse"]
    sparse = CascadePlanner(POLICIES["sparse"])
    assert not sparse.drafts(costs, 1, 100)  # not served: plain steps, not an error
    fixed = CascadePlanner(POLICIES["cascade-fixed"])
    assert [level.level for level in fixed.budget(costs, 8, 100).levels] == ["lookup", "small"]
    assert not fixed.budget(costs, 8, 100).levels[1].budget.HasField("cast")


def test_a_step_loops_cascade_planners_outlive_fixed_shapes():
    """The step loop's Planners builds a cascade's planner (the fixed cascade's too, which learns each level's
    acceptance) and keeps it however many fixed shapes requests name."""
    from orchestrator.cascade import make_planner
    from orchestrator.planner import Planners
    from orchestrator.policies import resolve_policy

    planners = Planners(make_planner, max_fixed=2)
    kept = {name: planners.get(POLICIES[name]) for name in ("cascade", "cascade-fixed", "lookup")}
    assert all(isinstance(p, CascadePlanner) for p in kept.values())
    kept["cascade-fixed"].acceptance.count_step({"lookup"})  # learned
    for depth in range(1, 9):
        planners.get(resolve_policy(f"chain:{depth}", "cast"))
    assert all(planners.get(POLICIES[name]) is p for name, p in kept.items())
    assert kept["cascade-fixed"].acceptance.tries("lookup") == 1
    assert type(planners.get(POLICIES["cast"])) is not CascadePlanner


COPYING = [10, 11, 12, 13, 14, 15, 16, 99, 12, 13, 14, 15]  # the last 4 tokens repeat earlier text: lookup's run 4
WRITING = [1, 2, 3, 4, 5, 6, 7, 8, 3]  # the last token occurred before: lookup's run 1
NOTHING = [1, 2, 3, 4, 5, 6, 7, 8]  # no earlier occurrence: lookup finds nothing


def test_copying_and_writing_steps_learn_their_own_arm():
    """The edit set on the GPU (reports/cascade/): lookup alone won on the mix of steps, the cascade trailed it.
    Copying, lookup's chains are accepted whole; writing, they miss and the small draft pays: each mode learns its
    own winner, and a text that alternates between the two is written faster than by any single arm."""
    outcomes = {True: {"small": (8.5, 20.0), "sparse": (8.0, 40.0), "lookup": (8.0, 10.5), "plain": (1.0, 10.0)},
                False: {"small": (4.0, 20.0), "sparse": (3.0, 40.0), "lookup": (1.1, 10.5), "plain": (1.0, 10.0)}}

    def write(planner: CascadePlanner | None, arm: str = "", tokens: float = 20_000, segment: int = 40):
        """Spends steps on `tokens` of text that copies `segment` tokens, then writes `segment` new ones. Returns
        the ms taken over the second half, and the arms run there, copying and writing."""
        costs, done, millis, arms = costs_with_levels(small_ms=0.1, sparse_ms=0.5), 0.0, 0.0, {True: [], False: []}
        while done < tokens:
            copying = int(done // segment) % 2 == 0
            if planner is not None:
                drafts = planner.drafts(costs, 1, 100, [COPYING if copying else WRITING])
                arm = [level.level for level in planner.budget(costs, 1, 100).levels][-1] if drafts else "plain"
            t, ms = outcomes[copying][arm]
            if planner is not None:
                planner.learn_step(1, drafts, [ROOT], [t], ms, False)
            done += t
            if done > tokens / 2:
                millis += ms
                arms[copying].append(arm)
        return millis, arms

    planner = CascadePlanner(POLICIES["cascade"])
    millis, arms = write(planner)
    assert planner.gates["copying"] is not planner.gates["writing"]
    assert arms[True].count("lookup") / len(arms[True]) > 0.85
    assert arms[False].count("small") / len(arms[False]) > 0.85
    best_single = min(write(None, arm)[0] for arm in outcomes[True])  # the small draft: 294 ms per 80 tokens
    assert millis < best_single / 1.05  # each mode's best: 252.5 ms, 1.16x; probing the losers costs some


def test_a_policy_without_lookup_learns_in_one_mode():
    """Without lookup no arm depends on whether the text is copied: a second gate would only double the probes."""
    planner = CascadePlanner(POLICIES["sparse"])
    costs = costs_with_levels(small_ms=0.1, sparse_ms=0.5)
    planner.drafts(costs, 1, 100, [COPYING])
    assert planner.copying is False and planner.gate is planner.gates["writing"]
    cascade = CascadePlanner(POLICIES["cascade"])
    cascade.drafts(costs, 1, 100, [COPYING])
    assert cascade.copying is True and cascade.gate is cascade.gates["copying"]


def drive_modes(costs: CostModel, modes: list[bool], outcomes: dict[bool, dict[str, tuple[float, float]]]
                ) -> dict[bool, list[str]]:
    """A cascade's steps at batch 1, each copying or writing as `modes` says, each arm's step committing and taking
    what `outcomes[copying]` says. Returns the arms run, per mode."""
    planner, arms = CascadePlanner(POLICIES["cascade"]), {True: [], False: []}
    for copying in modes:
        drafts = planner.drafts(costs, 1, 100, [COPYING if copying else WRITING])
        arm = [level.level for level in planner.budget(costs, 1, 100).levels][-1] if drafts else "plain"
        arms[copying].append(arm)
        planner.learn_step(1, drafts, [ROOT], [outcomes[copying][arm][0]], outcomes[copying][arm][1], False)
    return arms


def test_a_mode_starts_from_what_the_other_judged_of_plain_decoding_and_the_model_levels():
    """The GPU's target-only stack on HumanEval (reports/cascade/): the sparse level, ~2.3 tokens in 19 ms against
    plain decoding's 1 in 3.1, was measured in its first five steps in each mode, ~13 % of a short block, and the
    cascade trailed `ar`. A level costs the same in both modes: copying starts from what writing judged of it, and
    measures only lookup alone, whose chains are what differ."""
    outcomes = {True: {"sparse": (9.0, 19.0), "lookup": (8.0, 4.5), "plain": (1.0, 3.1)},
                False: {"sparse": (2.3, 19.0), "lookup": (1.4, 4.5), "plain": (1.0, 3.1)}}
    arms = drive_modes(sparse_and_lookup(), [False] * 100 + [True] * 100, outcomes)
    assert 4 <= arms[False].count("sparse") <= 8  # its first step (one-off costs) and JUDGE_AFTER, then a probe
    assert arms[True].count("sparse") <= 1 and arms[True][:3].count("lookup") >= 1
    assert arms[True][20:].count("lookup") / 80 > 0.9


def test_copying_runs_lookup_alone_first_not_a_level_judged_writing():
    """The GPU's HumanEval pair (reports/cascade/): copying started from the small draft judged writing (4.4 tokens
    in 9.5 ms) and ran it until lookup alone was judged, 14 steps at 0.59 tokens/ms against lookup alone's 1.32.
    Copying, lookup alone is learned first."""
    outcomes = {True: {"small": (7.9, 13.4), "sparse": (8.3, 24.4), "lookup": (7.5, 5.7), "plain": (1.0, 3.7)},
                False: {"small": (4.4, 9.5), "sparse": (2.4, 17.6), "lookup": (1.7, 5.1), "plain": (1.0, 3.1)}}
    arms = drive_modes(costs_with_levels(0.1, 0.5), [False] * 100 + [True] * 40, outcomes)
    assert arms[False][-50:].count("small") > 40  # writing: the small draft won
    assert arms[True][:5] == ["lookup"] * 5  # copying: lookup alone from the first step until it is judged
    assert arms[True].count("small") <= 2 and arms[True].count("lookup") > 34


def test_lookup_alone_verifies_its_whole_chain_and_an_early_miss_does_not_starve_it():
    """The CPU's `lookup` policy (reports/cascade/, 2026-12-07): cut by its learned acceptance, lookup alone's chain
    lost its depth-1 node after one early miss, so nothing of it was verified, or learned, again, and the policy
    decoded plainly (1.00 token a step) for whole runs. Here: a CPU-like verifier (0.5 ms a token over 7.5), a first
    chain rejected at depth 1, then text that lookup copies exactly."""
    from types import SimpleNamespace

    verify = table(0.5, 7.5, "target")
    costs = CostModel.from_tables(verify, table(0.01, 0.1, "small"))
    costs.levels = {"lookup": CostModel.from_tables(verify, table(0.0, 0.01, "lookup"))}
    planner, committed_per_step, lookup_steps = CascadePlanner(POLICIES["lookup"]), [], []
    for step in range(30):
        drafts = planner.drafts(costs, 1, 100, [COPYING])
        if not drafts:  # a plain step (the gate measures plain decoding too)
            planner.learn_step(1, False, [ROOT], [1], 8.0, False)
            committed_per_step.append(1)
            continue
        values = [1.0] + chain_values(8, list(planner.budget(costs, 1, 100).levels[0].acceptance)).tolist()
        chain = TokenTree.from_lists([5] + list(range(10, 18)), list(range(-1, 8)), list(range(9)), values)
        verified = planner.select([chain], costs, 1, 100)[0]
        # The target's tokens: the first step writes something else, then it copies what lookup proposes.
        accepted = [] if step == 0 else [int(t) for t in verified.tokens[1:]]
        committed = accepted + [99]
        planner.learn_levels([SimpleNamespace(tree=chain, node_levels=[-1] + [0] * 8)], [verified], [committed])
        planner.learn_step(1, True, [verified], [len(committed)], 7.5 + 0.5 * len(verified), False)
        committed_per_step.append(len(committed))
        lookup_steps.append(len(committed))
    assert lookup_steps[0] == 1 and set(lookup_steps[1:]) == {9}  # the whole chain, from right after the miss
    assert sum(committed_per_step[10:]) / 20 > 7  # lookup alone runs, not plain decoding


def test_where_lookup_finds_nothing_the_step_drafts_with_a_model_level_not_lookup_alone():
    """The CPU's edit set (reports/cascade/, 2026-12-07): writing, lookup alone won its mode by 8 % over the small
    draft (0.236 against 0.218 tokens/ms), so it ran where lookup found no match at all, one-token steps with an
    Expand call added, where the small draft commits five. Here: writing steps, one in four with nothing to look up."""
    outcomes = {True: {"small": (5.6, 25.9), "sparse": (2.0, 28.0), "lookup": (3.3, 11.5), "plain": (1.0, 7.6)},
                False: {"small": (4.5, 25.9), "sparse": (1.5, 28.0), "lookup": (1.0, 11.0), "plain": (1.0, 7.6)}}
    planner, costs, arms = CascadePlanner(POLICIES["cascade"]), costs_with_levels(0.1, 0.5), {True: [], False: []}
    for step in range(400):
        found = step % 4 != 0
        drafts = planner.drafts(costs, 1, 100, [WRITING if found else NOTHING])
        assert planner.copying is False
        arm = [level.level for level in planner.budget(costs, 1, 100).levels][-1] if drafts else "plain"
        arms[found].append(arm)
        planner.learn_step(1, drafts, [ROOT], [outcomes[found][arm][0]], outcomes[found][arm][1], False)
    assert "lookup" not in arms[False]  # nothing found: never lookup alone ...
    nothing = [outcomes[False][arm][0] for arm in arms[False][-100:]]
    assert sum(nothing) / len(nothing) > 2.5  # ... but mostly the small draft (plain decoding probed): 1.0 before
    assert arms[True][-150:].count("lookup") > 120  # found: lookup alone, its mode's winner


def lookup_alone_budget(planner: CascadePlanner, costs: CostModel):
    planner.arm = "lookup"
    planner.chosen = None
    return planner.budget(costs, 1, 100).levels[0]


def observe_chains(planner: CascadePlanner, length: int, accepted: int, steps: int = 40) -> None:
    """Lookup-alone steps whose chain of `length` had its first `accepted` tokens accepted."""
    chain = TokenTree.from_lists(list(range(length + 1)), list(range(-1, length)), list(range(length + 1)),
                                 [1.0] * (length + 1))
    for _ in range(steps):
        planner.acceptance.count_step({"lookup"})
        planner.acceptance.observe(chain, [None] + ["lookup"] * length, list(range(1, accepted + 1)) + [99])


def test_lookup_alone_grows_its_chain_where_it_is_accepted_whole_and_shrinks_it_where_it_misses():
    """DyTC's draft length: a copying sequence's chains of 8 accepted whole are worth growing; chains that miss at
    their second token are cut short (a verifier that costs 10 ms and 0.5 ms a token, a CPU's shape)."""
    verify = CostTable.linear(0.5, 10.0, batch_sizes=(1, 8), context_buckets=(128, 2048),
                              token_counts=(1, 2, 4, 8, 16, 32, 64), device="cpu", model_id="target", dtype="float32")
    costs = CostModel.from_tables(verify, table(0.01, 0.1, "small"))
    costs.levels = {"lookup": CostModel.from_tables(verify, table(0.0, 0.01, "lookup"))}
    copying = CascadePlanner(POLICIES["lookup"])
    first = lookup_alone_budget(copying, costs).budget.max_depth
    observe_chains(copying, 8, accepted=8)
    grown = lookup_alone_budget(copying, costs)
    assert grown.budget.max_depth > 8 >= first
    assert grown.budget.max_depth <= POLICIES["lookup"].verify_tokens - 1  # what lookup alone verifies
    assert len(grown.acceptance) == grown.budget.max_depth and min(grown.acceptance) > 0.9  # extrapolated
    writing = CascadePlanner(POLICIES["lookup"])
    observe_chains(writing, 8, accepted=1)
    assert lookup_alone_budget(writing, costs).budget.max_depth == 1


def test_lookup_riding_along_a_model_level_keeps_the_policys_depth():
    planner = CascadePlanner(POLICIES["cascade"])
    costs = costs_with_levels(small_ms=0.1, sparse_ms=0.5)
    observe_chains(planner, 8, accepted=8)
    assert planner.drafts(costs, 1, 100)
    budget = planner.budget(costs, 1, 100)
    assert [level.level for level in budget.levels] == ["lookup", "small"]
    assert budget.levels[0].budget.max_depth == POLICIES["cascade"].max_depth


def test_a_level_that_cannot_catch_lookup_alone_even_accepted_whole_is_not_probed_while_copying():
    """The CPU's edit set (reports/cascade/): copying, lookup alone committed 6.6 tokens in 24 ms; the sparse level's
    steps (117 ms for at most 1 + 8 tokens) were still probed, 6 % of the cascade's time. Writing, where it may win
    (at most 9 tokens in 73 ms against the small draft's 4.6 in 40), it is still measured and probed."""
    outcomes = {True: {"small": (6.5, 64.6), "sparse": (5.5, 117.0), "lookup": (6.6, 24.0), "plain": (1.0, 14.0)},
                False: {"small": (4.6, 39.8), "sparse": (3.6, 72.6), "lookup": (2.6, 24.6), "plain": (1.0, 14.0)}}
    costs = costs_with_levels(small_ms=3.0, sparse_ms=10.0)  # priced as measured: ~38 and ~94 ms a step
    arms = drive_modes(costs, ([True] * 100 + [False] * 50) * 4, outcomes)
    assert arms[True].count("sparse") == 0 and arms[True].count("small") == 0
    assert arms[True][10:].count("lookup") / 390 > 0.95
    assert arms[False].count("sparse") >= 1 and arms[False][-100:].count("small") > 80
