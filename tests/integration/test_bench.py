"""`cast bench` over a real stack: one level's numbers, and the check that every greedy policy produced `ar`'s
tokens for each prompt."""

from __future__ import annotations

import asyncio

from benchmarks.bench import RequestResult, count_differences, run_level, write_csv
from tests.integration.stacks import prompts_for_tests


def test_a_level_reports_what_it_measured_and_outputs_match_ar(tiny_stack, tmp_path):
    prompts = prompts_for_tests(4)
    levels = [asyncio.run(run_level(tiny_stack.spec.address, prompts, policy, 2, max_new_tokens=8, max_requests=4,
                                    max_seconds=120)) for policy in ("ar", "cast", "eagle2")]
    for level, results in levels:
        assert level.requests == 4 and level.completion_tokens == sum(len(r.token_ids) for r in results) > 0
        assert level.tokens_per_s > 0 and level.ttft_p50_ms > 0 and level.step_ms_p50 > 0
    (ar, _), (cast, _), (eagle2, _) = levels
    assert ar.mean_accepted_length == 1.0 and cast.mean_accepted_length >= 1.0
    # ar verifies the root alone; a drafted step verifies part of what the draft proposed
    assert (ar.expanded_nodes_per_step, ar.verified_nodes_per_step, ar.verified_depth_per_step) == (1.0, 1.0, 0.0)
    assert cast.expanded_nodes_per_step >= cast.verified_nodes_per_step >= 1.0
    # the RPC overhead split by call: ar makes no Expand call, eagle2 one every step (cast's gate may skip some)
    assert ar.expand_rpc_ms_p50 == 0.0 and ar.verify_rpc_ms_p50 > 0
    assert eagle2.expand_rpc_ms_p50 > 0 and eagle2.verify_rpc_ms_p50 > 0
    count_differences(levels)
    assert ar.differ_from_ar == cast.differ_from_ar == eagle2.differ_from_ar == 0  # float64 verifier: lossless
    write_csv([ar, cast], tmp_path / "bench.csv")
    assert "differ_from_ar" in (tmp_path / "bench.csv").read_text().splitlines()[0].split(",")


def test_a_cutoff_cancels_the_requests_in_flight_and_counts_what_they_received(tiny_stack):
    prompts = prompts_for_tests(2)
    _, full = asyncio.run(run_level(tiny_stack.spec.address, prompts, "ar", 2, max_new_tokens=24, max_requests=2,
                                    max_seconds=120))
    # The cutoff falls a third of the way through the same requests' whole run on this machine, however fast it is
    # today: the faster of two runs (the first may be several times slower, while cast's gate learns this batch size).
    whole = min(asyncio.run(run_level(tiny_stack.spec.address, prompts, "cast", 2, max_new_tokens=400, max_requests=2,
                                      max_seconds=120))[0].wall_s for _ in range(2))
    cutoff_s = whole / 3
    level, cut = asyncio.run(run_level(tiny_stack.spec.address, prompts, "cast", 2, max_new_tokens=400,
                                       max_requests=2, max_seconds=120, cutoff_s=cutoff_s))
    assert level.wall_s < cutoff_s + 4 and level.cut_requests == level.requests == 2
    assert level.completion_tokens == sum(len(r.token_ids) for r in cut) > 0
    reference = {r.prompt: r.token_ids for r in full}
    for r in cut:  # a prefix of the whole output, and the same tokens as ar's as far as both go
        n = min(len(r.token_ids), len(reference[r.prompt]))
        assert r.cut and r.token_ids[:n] == reference[r.prompt][:n]
    # the cancelled requests left nothing behind that stops the next ones
    again, results = asyncio.run(run_level(tiny_stack.spec.address, prompts, "cast", 2, max_new_tokens=8,
                                           max_requests=2, max_seconds=120, cutoff_s=60))
    assert again.cut_requests == 0 and all(len(r.token_ids) == 8 for r in results)


def test_differences_are_counted_against_ar_per_prompt():
    def result(prompt: str, tokens: list[int]) -> RequestResult:
        return RequestResult(prompt, tokens, 0.1, 0.2, len(tokens), 1, 1.0, 0, 0, 0, 1.0, 1.0, 1.0, [])

    class Level:
        def __init__(self, policy: str) -> None:
            self.policy, self.differ_from_ar = policy, -1

    ar, cast, none = Level("ar"), Level("cast"), Level("chain")
    count_differences([(ar, [result("a", [1, 2]), result("b", [3])]), (cast, [result("b", [3]), result("a", [1, 9])])])
    assert (ar.differ_from_ar, cast.differ_from_ar) == (0, 1)
    count_differences([(none, [result("a", [1])])])
    assert none.differ_from_ar == -1  # no ar run: nothing to compare with


def test_warmup_requests_are_not_counted(tiny_stack, tmp_path):
    import csv
    import json

    from benchmarks.bench import main

    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts_for_tests(3)))
    out = tmp_path / "out"
    assert main(["--addr", tiny_stack.spec.address, "--policies", "ar", "--concurrency", "2", "--requests", "3",
                 "--warmup", "1", "--prompts", str(source), "--max-new-tokens", "4", "--out", str(out)]) == 0
    [row] = list(csv.DictReader((out / "bench.csv").open()))
    assert int(row["requests"]) == 3, "the 2 warm-up requests (1 per client) stay out of the level"
