"""Draft levels and the cascade on one machine: tokens/s and tokens per step for ar, each level alone (small,
sparse, lookup), `cast` with the small draft, `eagle2`, the fixed cascade and `cascade` (DyTC), at batch 1 and 8, on
HumanEval and on a repetitive set (code-editing prompts that repeat their input); and `cascade` on a stack with no
draft model (the target's sparse and lookup levels only).

    python -m benchmarks.cascade_report --out reports/cascade/cpu [--rounds 2] [--requests 8]

Two stacks on loopback: the reference pair with every level, and the reference target alone. Levels are run in
rounds, each round in the opposite order of the one before (a machine whose load drifts hits every policy alike);
each row of the result is the mean over rounds, and the ratios to `ar` are taken within each round first.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import gzip
import json
import platform
import signal
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks.bench import run_level
from cast_models.humaneval import data_path, load_prompts
from orchestrator.stack import REFERENCE_PAIR, Stack, StackSpec, free_ports

POLICIES = ("ar", "lookup", "sparse", "small", "cast", "eagle2", "cascade-fixed", "cascade")


def edit_prompts(count: int) -> list[str]:
    """HumanEval solutions written out, then asked for again unchanged: the continuation copies the input, as a
    code edit's output mostly does."""
    with gzip.open(data_path(), "rt") as f:
        problems = [json.loads(line) for line in f][:count]
    return [f"{p['prompt']}{p['canonical_solution']}\n\n# The same function again, unchanged:\n{p['prompt']}".rstrip()
            for p in problems]


def start(target: Path, draft: Path | None, log_dir: Path, threads: int, sparse: str) -> Stack:
    port, draft_port, verify_port = free_ports(3)
    spec = StackSpec(target, draft, port=port, draft_port=draft_port, verify_port=verify_port, log_dir=log_dir,
                     draft_args=["--threads", str(threads)] if threads else [],
                     draft_levels=(sparse, "lookup") if sparse != "none" else ("lookup",))
    stack = Stack(spec).start()
    try:
        stack.wait_ready(1200)
    except BaseException:
        stack.stop()  # its services that did start
        raise
    return stack


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cascade_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=8, help="requests per level at batch 1 (batch c: 2 c)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--draft-threads", type=int, default=0, help="the draft services' ORT threads (0: ORT's default)")
    p.add_argument("--target", type=Path, default=REFERENCE_PAIR / "target")
    p.add_argument("--draft", type=Path, default=REFERENCE_PAIR / "draft")
    p.add_argument("--sparse", default="sparse",
                   help="the sparse level: 'sparse' (chosen from the target's layers), sparse=DIR (a checkpoint) or "
                        "'none' (no sparse level, no target-only stack)")
    p.add_argument("--sets", default="humaneval,edit")
    p.add_argument("--no-target-only", action="store_true",
                   help="with a sparse level, no second stack without the draft model (on an 80 GB GPU the 1B "
                        "shape's two verifiers, ~35 GB each, and the draft services do not fit together)")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # the stacks stop in `finally`
    a.out.mkdir(parents=True, exist_ok=True)
    sets = {"humaneval": [q.rstrip() for q in load_prompts()], "edit": edit_prompts(64)}
    sets = {name: sets[name] for name in a.sets.split(",")}
    stacks = {}
    levels = [("pair", policy) for policy in a.policies.split(",") if a.sparse != "none" or policy != "sparse"]
    rows = []
    try:  # a stack that fails to start must not leave the other running
        stacks["pair"] = start(a.target, a.draft, a.out / "logs-pair", a.draft_threads, a.sparse)
        if a.sparse != "none" and not a.no_target_only:
            stacks["target-only"] = start(a.target, None, a.out / "logs-target", a.draft_threads, a.sparse)
            levels.append(("target-only", "cascade"))
        for r in range(a.rounds):
            order = levels if r % 2 == 0 else levels[::-1]
            for name, prompts in sets.items():
                for c in (int(x) for x in a.concurrency.split(",")):
                    for stack, policy in order:
                        n = a.requests if c == 1 else 2 * c  # a batch of c until the last c requests drain
                        address = stacks[stack].spec.address
                        asyncio.run(run_level(address, prompts[n:], policy, c, 8, c, 60))  # warm-up, untimed
                        row, results = asyncio.run(run_level(address, prompts, policy, c, a.max_new_tokens, n, 300))
                        rows.append({"round": r, "set": name, "batch": c, "stack": stack, "policy": policy,
                                     "tokens_per_s": row.tokens_per_s, "tokens_per_step": row.mean_accepted_length,
                                     "draft_ms_per_step": row.draft_ms_per_step,
                                     "verify_ms_per_step": row.verify_ms_per_step,
                                     "verified_nodes": row.verified_nodes_per_step,
                                     "outputs": {r.prompt: r.token_ids for r in results},
                                     "kinds": [(b.mode, b.arm, b.accepted_tokens, b.step)
                                               for r in results for b in r.step_breakdowns]})
                        print(f"round {r} {name:9} c={c} {stack:11} {policy:13} {row.tokens_per_s:7.1f} tok/s "
                              f"{row.mean_accepted_length:5.2f} tok/step draft {row.draft_ms_per_step:5.1f} ms "
                              f"verify {row.verify_ms_per_step:5.1f} ms", file=sys.stderr, flush=True)
    finally:
        for stack in stacks.values():
            stack.stop()
    write(rows, a)
    return 0


def write(rows: list[dict], a) -> None:
    fields = [k for k in rows[0] if k not in ("outputs", "kinds")]
    with open(a.out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: v for k, v in row.items() if k in fields} for row in rows)
    # Greedy everywhere: every policy's outputs must be ar's.
    ar = {(r["round"], r["set"], r["batch"]): r["outputs"] for r in rows if r["policy"] == "ar"}
    differ = sum(tokens != ar[(r["round"], r["set"], r["batch"])].get(prompt, tokens)
                 for r in rows for prompt, tokens in r["outputs"].items())  # requests, matched by prompt
    lines = [f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} "
             f"({platform.processor() or platform.machine()}); {a.rounds} rounds, {a.requests} requests per level at "
             f"batch 1 (2 c at batch c), {a.max_new_tokens} new tokens, greedy. Requests whose output "
             f"differs from ar's for the same prompt: {differ}.", "",
             "| set | batch | stack | policy | tokens/s | × ar (per round) | tokens/step | draft ms/step | "
             "verify ms/step |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["set"], r["batch"], r["stack"], r["policy"]) for r in rows},
                  key=lambda k: (k[0], k[1], POLICIES.index(k[3]) + (k[2] == "target-only") * 10))
    for key in keys:
        mine = [r for r in rows if (r["set"], r["batch"], r["stack"], r["policy"]) == key]
        ratios = [r["tokens_per_s"] / next(x["tokens_per_s"] for x in rows if x["policy"] == "ar" and
                  (x["round"], x["set"], x["batch"]) == (r["round"], r["set"], r["batch"])) for r in mine]

        def mean(field: str) -> float:
            return statistics.mean(r[field] for r in mine)

        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {mean('tokens_per_s'):.1f} | "
                     f"{statistics.mean(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)}) | "
                     f"{mean('tokens_per_step'):.2f} | {mean('draft_ms_per_step'):.1f} | "
                     f"{mean('verify_ms_per_step'):.1f} |")
    lines += ["", *comparisons(rows), "", *profile(rows)]
    (a.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def comparisons(rows: list[dict]) -> list[str]:
    """The issue's targets, as ratios of tokens/s taken within each round (then averaged over rounds). With 3
    rounds or more, also their mean after the first ("warm"): round 0 is each stack's first block, where the
    learners (the gate per batch size and mode, the calibration) start from nothing, as a server does once."""
    def tps(r: int, s: str, b: int, policy: str, stack: str = "pair") -> float | None:
        return next((x["tokens_per_s"] for x in rows if (x["round"], x["set"], x["batch"], x["policy"], x["stack"])
                     == (r, s, b, policy, stack)), None)

    out = ["| set | batch | cascade / best single level | cascade (no small draft) / ar | cascade / cascade-fixed | "
           "cascade / eagle2 | cascade / cast |", "|---|---|---|---|---|---|---|"]
    for s, b in sorted({(x["set"], x["batch"]) for x in rows}, key=lambda k: (k[0], k[1])):
        ratios: dict[str, list[float]] = {}
        for r in sorted({x["round"] for x in rows}):
            cascade = tps(r, s, b, "cascade")
            singles = [v for v in (tps(r, s, b, level) for level in ("lookup", "sparse", "small")) if v]
            pairs = {"best": max(singles) if singles else None, "fixed": tps(r, s, b, "cascade-fixed"),
                     "eagle2": tps(r, s, b, "eagle2"), "cast": tps(r, s, b, "cast")}
            for name, other in pairs.items():
                if cascade and other:
                    ratios.setdefault(name, []).append(cascade / other)
            alone, ar = tps(r, s, b, "cascade", "target-only"), tps(r, s, b, "ar")
            if alone and ar:
                ratios.setdefault("alone", []).append(alone / ar)

        def cell(name: str) -> str:
            values = ratios.get(name)
            if not values:
                return "-"
            warm = f"; warm {statistics.mean(values[1:]):.2f}" if len(values) > 2 else ""
            return f"{statistics.mean(values):.2f} ({', '.join(f'{v:.2f}' for v in values)}{warm})"

        out.append(f"| {s} | {b} | {cell('best')} | {cell('alone')} | {cell('fixed')} | {cell('eagle2')} | "
                   f"{cell('cast')} |")
    return out


def profile(rows: list[dict]) -> list[str]:
    """Where the learning policies' steps went (all rounds): per kind of step (StepStats.arm; a cascade's in its
    copying or writing mode), its steps, share of the time, tokens per sequence and ms a step, and tokens per ms:
    what the gate chose and what each arm measured."""
    kinds: dict[tuple, list] = defaultdict(list)
    for r in rows:
        if r["policy"] in ("lookup", "cascade"):
            kinds[r["set"], r["batch"], r["stack"], r["policy"]] += r["kinds"]
    out = ["| set | batch | stack | policy | mode | arm | steps | share of time | tokens/step | ms/step | tokens/ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, steps in sorted(kinds.items()):
        total = sum(ms for *_, ms in steps) or 1.0
        by_kind: dict[tuple[str, str], list] = defaultdict(list)
        for mode, arm, tokens, ms in steps:
            by_kind[mode, arm].append((tokens, ms))
        for (mode, arm), xs in sorted(by_kind.items()):
            tokens, ms = sum(t for t, _ in xs), sum(m for _, m in xs)
            out.append(f"| {' | '.join(map(str, key))} | {mode or '-'} | {arm} | {len(xs)} | {ms / total:.2f} | "
                       f"{tokens / len(xs):.2f} | {ms / len(xs):.1f} | {tokens / max(ms, 1e-9):.3f} |")
    return out


if __name__ == "__main__":
    sys.exit(main())
