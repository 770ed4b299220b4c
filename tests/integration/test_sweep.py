"""`cast sweep` over a real stack: every cell's outputs equal `ar`'s, and the summary names the oracle and the best
single shape from the cells' numbers."""

from __future__ import annotations

import csv
import json

from benchmarks.bench import LevelResult
from benchmarks.sweep import Cell, confirm_plan, differs, expand_policies, main, summarize
from tests.integration.stacks import prompts_for_tests


def test_a_sweep_measures_every_cell_and_checks_it_against_ar(tiny_stack, tmp_path):
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts_for_tests(4)))
    out = tmp_path / "out"
    assert main(["--addr", tiny_stack.spec.address, "--policies", "ar,chain:2,tree:2x2/8,tree:2x2/16,cast",
                 "--concurrency", "1,2", "--requests", "2,4", "--rounds", "2", "--prompts", str(source),
                 "--max-new-tokens", "6", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))  # the confirmation's cells: the verdict's
    screen = list(csv.DictReader((out / "screen.csv").open()))
    # tree:2x2/16 holds 7 nodes, as tree:2x2/8 verifies: measured once; the confirmation measures all 3 shapes again
    cells = {(p, c) for p in ("ar", "chain:2", "tree:2x2/8", "cast") for c in ("1", "2")}
    assert {(r["policy"], r["concurrency"]) for r in rows} == {(r["policy"], r["concurrency"]) for r in screen} == cells
    for r in rows + screen:
        assert r["rounds"] == "2" and int(r["requests"]) == 2 * (2 if r["concurrency"] == "1" else 4)
        assert r["differ_from_ar"] == "0", r  # float64 verifier: every cell lossless
        assert float(r["tokens_per_s"]) > 0
    stages = [r["stage"] for r in csv.DictReader((out / "rounds.csv").open())]
    assert stages.count("screen") == stages.count("confirm") == 2 * len(rows)
    text = (out / "sweep.md").read_text()
    assert "oracle (best fixed shape)" in text and "cast / best single" in text
    assert "tree:2x2/16 = tree:2x2/8" in text and (out / "sweep.png").stat().st_size > 0

    # Why a cell misses: the verified trees and the cost model's predicted step time against the measured one.
    by = {(r["policy"], r["concurrency"]): r for r in rows}
    for c in ("1", "2"):
        plain, chain = by["ar", c], by["chain:2", c]
        assert float(plain["verified_nodes_p50"]) == 1 and float(plain["verified_depth_p50"]) == 0
        assert float(plain["accepted_tokens_p50"]) == 1  # plain decoding: one token a step
        assert 1 <= float(chain["verified_nodes_p50"]) <= 3 and float(chain["verified_depth_p50"]) <= 2
        for r in (chain, by["tree:2x2/8", c], by["cast", c]):  # drafted policies: Expand and Verify predicted
            assert float(r["predicted_ms_p50"]) > 0 and float(r["measured_ms_p50"]) > 0, r
            assert float(r["measured_over_predicted_p50"]) > 0, r
            assert float(r["accepted_tokens_p50"]) >= 1, r
        for r in (chain, by["tree:2x2/8", c]):  # each call's own measured / predicted, which the why section shows
            assert float(r["draft_over_predicted_p50"]) > 0 and float(r["verify_over_predicted_p50"]) > 0, r
    why = text[text.index("## Why CAST misses"):].splitlines()
    for c in ("1", "2"):
        oracle = max(("ar", "chain:2", "tree:2x2/8"), key=lambda p: float(by[p, c]["tokens_per_s"]))
        assert any(line.startswith(f"| {c} | oracle: {oracle} |") for line in why), (c, oracle)
        cast_row = next(line for line in why if line.startswith(f"| {c} | cast"))
        ratio = float(by["cast", c]["tokens_per_s"]) / float(by[oracle, c]["tokens_per_s"])
        assert ("(MISS)" in cast_row) == (ratio < 0.97), (cast_row, ratio)


def level(policy: str, c: int, rate: float) -> LevelResult:
    return LevelResult(policy, c, 8, 100, 1.0, rate, *([1.0] * 21))


def test_the_oracle_is_the_best_fixed_shape_per_concurrency_and_the_best_single_the_best_compromise():
    rates = {"ar": (100, 400), "chain:4": (200, 380), "tree:4x5/16": (210, 300), "cast": (205, 420)}
    cells = {}
    for policy, (at1, at8) in rates.items():
        for c, rate in ((1, at1), (8, at8)):
            cells[policy, c] = Cell(policy, c, [level(policy, c, rate * 0.9), level(policy, c, rate * 1.1)])
    s = summarize(cells, [1, 8])
    assert s.oracle == {1: "tree:4x5/16", 8: "ar"}  # cast adapts, so it is no fixed shape
    assert s.best_single == "chain:4"  # (200/210 * 380/400) ** 0.5 beats tree's and ar's compromises
    assert abs(s.ratio("cast", 1) - 205 / 210) < 1e-9
    assert abs(s.geomean("cast", "chain:4") - ((205 / 200) * (420 / 380)) ** 0.5) < 1e-9


def test_the_confirmation_measures_again_each_concurrencys_best_shapes_the_best_single_ones_and_cast():
    """Judged on the screen, the oracle is the best of ~40 noisy cells: inflated by the noise that picked it."""
    rates = {"ar": (100, 400), "chain:4": (200, 380), "chain:6": (190, 300), "tree:4x5/16": (210, 300),
             "tree:8x7/64": (150, 200), "cast": (205, 420)}
    screen = {(p, c): Cell(p, c, [level(p, c, rate)]) for p, r in rates.items() for c, rate in zip((1, 8), r)}
    plan = confirm_plan(screen, [1, 8], 2)
    # The two best at each concurrency, then the two best single shapes (chain:4 0.95x the oracles, tree:4x5/16
    # 0.87x; ar 0.69x), then cast; tree:8x7/64 and chain:6 are not measured again.
    assert plan[1] == ["tree:4x5/16", "chain:4", "cast"]
    assert plan[8] == ["ar", "chain:4", "tree:4x5/16", "cast"]
    # The verdict from cells measured at some concurrencies only: oracle per concurrency, best single everywhere.
    confirmed = {(p, c): Cell(p, c, [level(p, c, rates[p][c == 8] * (0.9 if p == "tree:4x5/16" else 1.0))])
                 for c, names in plan.items() for p in names}
    s = summarize(confirmed, [1, 8])
    assert s.oracle == {1: "chain:4", 8: "ar"} and s.best_single == "chain:4"


def test_the_issue_grid_has_every_distinct_tree_once():
    names, same = expand_policies("ar,grid,cast")
    assert names[0] == "ar" and names[-1] == "cast" and len(names) == len(set(names))
    assert [n for n in names if n.startswith("chain:")] == [f"chain:{d}" for d in range(2, 9)]
    assert len(names) - 2 - 7 + len(same) == 36  # 3 top-K x 3 depths x 4 sizes, duplicates folded
    assert same["tree:2x3/64"] == "tree:2x3/16"  # all of tree:2x3's 11 nodes


def test_a_cut_output_is_compared_with_ar_on_the_prefix_both_have():
    assert not differs([5, 6], [5, 6, 7]) and not differs([5, 6, 7], [5, 6])  # a cut request, a cut reference
    assert differs([5, 8], [5, 6, 7]) and differs([5, 6, 7, 9], [5, 6, 7, 8])
