"""`cast sweep`: CAST against every fixed tree shape of a grid, at several concurrencies, on one running stack.

Every cell (a policy at a concurrency) sends the same prompts, greedy, so every policy must produce `ar`'s tokens
(checked per request: `differ_from_ar`) and every cell generates the same text: tokens/s compare directly. Cells run
in rounds; each round visits every cell once, in an order rotated from round to round, so that a machine whose load
drifts (a shared one) slows all cells alike; a cell's tokens/s is its median over the rounds.

Two stages, as a user tunes: the screen measures every cell; the confirmation (`--confirm K`) measures again, in
rounds of their own, the K best fixed shapes of each concurrency, the K best single shapes across concurrencies and
CAST, and the verdict comes from the confirmation alone. The screen's best of ~40 noisy cells is inflated by its own
noise (a winner's curse: on the GPU a cell at concurrency 1 is one 48-token request of ~0.15 s), which no policy
measured once can reach; re-measured, the chosen shapes are judged on numbers that did not choose them.

Reported per concurrency: the oracle (the best fixed shape there; `ar`, the depth-0 shape, counts as one), the best
single shape across concurrencies (the highest geometric mean of its ratio to the oracle), and CAST's ratio to both;
as a CSV of every round (`rounds.csv`), a CSV of the medians (`sweep.csv`), a markdown summary (`sweep.md`) and a
plot (`sweep.png`). Why a cell misses (CAST under MISS_RATIO of the oracle): sweep.md sets, per concurrency, the
trees CAST verified beside the oracle's (median verified nodes, depth and tokens accepted per step) and the cost
model's predicted Expand + Verify time against the measured one (the step stats the orchestrator returns).

The issue's grid (`--policies ar,grid,cast`): chains of depth 2-8; EAGLE-2 trees of top-K 2, 4, 8 x depth 3, 5, 7 x
8, 16, 32, 64 nodes verified. A tree that holds fewer nodes than it may verify is the same tree as its smaller
siblings (tree:2x3/16 verifies all 11 nodes of tree:2x3, as /32 and /64 would): it is measured once, under the
first name.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.bench import LevelResult, RequestResult, load_prompts, run_level
from orchestrator.policies import POLICIES, resolve_policy

ISSUE_CHAINS = tuple(f"chain:{d}" for d in range(2, 9))
MISS_RATIO = 0.97  # issue 21: CAST reaches this share of the oracle's tokens/s in every cell
ISSUE_TREES = tuple(f"tree:{k}x{d}/{n}" for k in (2, 4, 8) for d in (3, 5, 7) for n in (8, 16, 32, 64))
CONFIRM = 3  # the shapes per concurrency (and single shapes) the confirmation measures again by default


def expand_policies(spec: str) -> tuple[list[str], dict[str, str]]:
    """The policies to measure, in order, from a comma list where `grid` stands for the issue's grid; and the
    duplicates left out: {name: the name measured for the same tree}. Names are checked as a request's are."""
    names: list[str] = []
    for item in spec.split(","):
        names += [*ISSUE_CHAINS, *ISSUE_TREES] if item == "grid" else [item]
    measured: dict[tuple, str] = {}
    same: dict[str, str] = {}
    out = []
    for name in names:
        policy = resolve_policy(name, "cast")
        if policy.cast is not None or name in POLICIES:
            key: tuple = (name,)
        else:  # a fixed shape: its tree, as verified
            key = (policy.top_k, policy.max_depth, policy.max_breadth, min(policy.verify_tokens, policy.tree_nodes))
        if key in measured:
            if measured[key] != policy.name:
                same[policy.name] = measured[key]
            continue
        measured[key] = policy.name
        out.append(policy.name)
    return out, same


def is_fixed(name: str) -> bool:
    """A fixed tree (ar included: the depth-0 shape), not a policy that adapts."""
    return resolve_policy(name, "cast").cast is None


@dataclass
class Cell:
    policy: str
    concurrency: int
    rounds: list[LevelResult] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(r.tokens_per_s for r in self.rounds) if self.rounds else 0.0

    @property
    def typical(self) -> LevelResult:
        """The round whose tokens/s is the median (the lower middle one of an even count)."""
        ordered = sorted(self.rounds, key=lambda r: r.tokens_per_s)
        return ordered[(len(ordered) - 1) // 2]

    @property
    def differ_from_ar(self) -> int:
        return sum(max(r.differ_from_ar, 0) for r in self.rounds)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.rounds)


@dataclass
class Summary:
    """Per concurrency: the oracle's shape and tokens/s, CAST's; the best single shape and its ratios."""

    concurrency: list[int]
    oracle: dict[int, str]
    best_single: str
    cast: str
    tokens_per_s: dict[tuple[str, int], float]

    def ratio(self, name: str, c: int, to: str | None = None) -> float:
        other = self.oracle[c] if to is None else to
        return self.tokens_per_s[name, c] / max(self.tokens_per_s[other, c], 1e-9)

    def geomean(self, name: str, to: str | None = None) -> float:
        return math.exp(statistics.mean(math.log(max(self.ratio(name, c, to), 1e-9)) for c in self.concurrency))


def summarize(cells: dict[tuple[str, int], Cell], concurrency: list[int], cast: str = "cast") -> Summary:
    """The oracle of each concurrency among the fixed shapes measured there; the best single shape among those
    measured at every concurrency."""
    rates = {key: cell.tokens_per_s for key, cell in cells.items()}
    fixed = fixed_shapes(cells)
    oracle = {c: max((p for p in fixed if (p, c) in rates), key=lambda p: rates[p, c]) for c in concurrency}
    partial = Summary(concurrency, oracle, "", cast, rates)
    best_single = max(measured_everywhere(cells, concurrency), key=partial.geomean)
    return Summary(concurrency, oracle, best_single, cast, rates)


def fixed_shapes(cells: dict[tuple[str, int], Cell]) -> list[str]:
    return sorted({p for p, _ in cells if is_fixed(p)})


def measured_everywhere(cells: dict[tuple[str, int], Cell], concurrency: list[int]) -> list[str]:
    """The fixed shapes measured at every concurrency: the candidates for the best single shape."""
    return [p for p in fixed_shapes(cells) if all((p, c) in cells for c in concurrency)]


def confirm_plan(screen: dict[tuple[str, int], Cell], concurrency: list[int], k: int,
                 cast: str = "cast") -> dict[int, list[str]]:
    """What the confirmation measures at each concurrency: the screen's k best fixed shapes there, its k best
    single shapes (measured at every concurrency), then the adaptive policy."""
    s = summarize(screen, concurrency, cast)
    singles = sorted(measured_everywhere(screen, concurrency), key=s.geomean, reverse=True)
    plan = {}
    for c in concurrency:
        best = sorted((p for p in fixed_shapes(screen) if (p, c) in screen), key=lambda p: s.tokens_per_s[p, c],
                      reverse=True)
        plan[c] = list(dict.fromkeys(best[:k] + singles[:k] + ([cast] if (cast, c) in screen else [])))
    return plan


def level_order(policies: list[str], round_index: int) -> list[str]:
    """Round r visits the policies rotated by r * len / rounds-ish steps, and every other round backwards, so that
    no policy always runs first or right after the same neighbour."""
    n = len(policies)
    shift = (round_index * (n // 3 + 1)) % n if n else 0
    order = policies[shift:] + policies[:shift]
    return order[::-1] if round_index % 2 else order


def count_differences(results: dict[tuple[str, int], list[RequestResult]], level: dict[tuple[str, int], LevelResult]) -> None:
    """Per level, its requests whose tokens differ from `ar`'s for the same prompt (the longest of any concurrency's
    `ar` outputs). A request cut at the cutoff, or an `ar` reference cut there, is compared on their common prefix."""
    reference: dict[str, list[int]] = {}
    for (policy, _), rs in results.items():
        if policy == "ar":
            for r in rs:
                if len(r.token_ids) > len(reference.get(r.prompt, ())):
                    reference[r.prompt] = r.token_ids
    if not reference:
        return
    for key, rs in results.items():
        level[key].differ_from_ar = sum(differs(r.token_ids, reference[r.prompt]) for r in rs if r.prompt in reference)


def differs(tokens: list[int], reference: list[int]) -> bool:
    n = min(len(tokens), len(reference))
    return tokens[:n] != reference[:n]


def run_sweep(a, plan: dict[int, list[str]], prompts: list[str], requests: dict[int, int], rounds: int,
              stage: str = "", log=print) -> dict[tuple[str, int], Cell]:
    """`rounds` visits of every cell of the plan (per concurrency, its policies)."""
    cells = {(p, c): Cell(p, c) for c, policies in plan.items() for p in policies}
    started = time.perf_counter()
    for round_index in range(rounds):
        results: dict[tuple[str, int], list[RequestResult]] = {}
        levels: dict[tuple[str, int], LevelResult] = {}
        for c, policies in plan.items():
            for policy in level_order(policies, round_index):
                if a.warmup_tokens > 0:  # one wave of short requests: first-use costs (graph captures) stay out
                    asyncio.run(run_level(a.addr, prompts, policy, c, a.warmup_tokens, c, a.seconds))
                level, rs = asyncio.run(run_level(a.addr, prompts, policy, c, a.max_new_tokens, requests[c], a.seconds,
                                                  a.cutoff or None))
                results[policy, c], levels[policy, c] = rs, level
                log(f"{stage}round {round_index + 1}/{rounds} c={c:<3} {policy:>12} {level.tokens_per_s:8.1f} tok/s "
                    f"{level.mean_accepted_length:5.2f} tok/step, {level.verified_nodes_per_step:5.1f} of "
                    f"{level.expanded_nodes_per_step:6.1f} nodes verified, step p50 {level.step_ms_p50:6.1f} ms "
                    f"(draft {level.draft_model_ms_p50:.1f}, verify {level.verify_model_ms_p50:.1f}), "
                    f"{level.requests} req ({level.cut_requests} cut)  [{time.perf_counter() - started:.0f} s]")
        count_differences(results, levels)
        for key, level in levels.items():
            cells[key].rounds.append(level)
    return cells


# ---- outputs ---------------------------------------------------------------------------------------------------


def write_csvs(stages: dict[str, dict[tuple[str, int], Cell]], out: Path) -> None:
    """rounds.csv: every round of every stage; per stage, its cells' medians: sweep.csv for the last stage (the
    verdict's), screen.csv for the screen where a confirmation followed it."""
    rows = [dict(stage=stage, round=i + 1, **asdict(r))
            for stage, cells in stages.items() for cell in cells.values() for i, r in enumerate(cell.rounds)]
    with (out / "rounds.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    last = list(stages)[-1]
    for stage, cells in stages.items():
        write_medians(cells, out / ("sweep.csv" if stage == last else f"{stage}.csv"))


def write_medians(cells: dict[tuple[str, int], Cell], path: Path) -> None:
    with path.open("w", newline="") as f:
        fields = ["policy", "concurrency", "tokens_per_s", "rounds", "requests", "cut_requests", "differ_from_ar",
                  "tokens_per_step", "verified_nodes_per_step", "expanded_nodes_per_step", "verified_depth_per_step",
                  "step_ms_p50", "draft_model_ms_p50", "verify_model_ms_p50", "overhead_ms_p50", "verified_nodes_p50",
                  "verified_depth_p50", "accepted_tokens_p50", "predicted_ms_p50", "measured_ms_p50",
                  "measured_over_predicted_p50", "draft_over_predicted_p50", "verify_over_predicted_p50"]
        writer = csv.writer(f)
        writer.writerow(fields)
        for cell in cells.values():
            t = cell.typical
            writer.writerow([cell.policy, cell.concurrency, f"{cell.tokens_per_s:.1f}", len(cell.rounds),
                             cell.requests, sum(r.cut_requests for r in cell.rounds), cell.differ_from_ar, f"{t.mean_accepted_length:.2f}",
                             f"{t.verified_nodes_per_step:.1f}", f"{t.expanded_nodes_per_step:.1f}",
                             f"{t.verified_depth_per_step:.2f}", f"{t.step_ms_p50:.1f}", f"{t.draft_model_ms_p50:.1f}",
                             f"{t.verify_model_ms_p50:.1f}", f"{t.overhead_ms_p50:.1f}", f"{t.verified_nodes_p50:g}",
                             f"{t.verified_depth_p50:g}", f"{t.accepted_tokens_p50:g}", f"{t.predicted_ms_p50:.1f}",
                             f"{t.measured_ms_p50:.1f}", f"{t.measured_over_predicted_p50:.2f}",
                             f"{t.draft_over_predicted_p50:.2f}", f"{t.verify_over_predicted_p50:.2f}"])


def markdown(cells: dict[tuple[str, int], Cell], s: Summary, same: dict[str, str], title: str,
             screen: dict[tuple[str, int], Cell] | None = None) -> str:
    """The summary and the trees from `cells` (the confirmation's, where there was one); every cell from `screen`."""
    cs = s.concurrency
    lines = [f"# {title}", ""]
    if screen is not None:
        lines += ["Verdict from the confirmation: the screen's best shapes and CAST measured again in rounds of their "
                  "own (the module docstring of benchmarks/sweep.py).", ""]
    lines += ["| concurrency | " + " | ".join(str(c) for c in cs) + " | geomean |",
              "| --- | " + " | ".join("---" for _ in cs) + " | --- |"]
    lines.append("| oracle (best fixed shape) | " + " | ".join(f"{s.oracle[c]} {s.tokens_per_s[s.oracle[c], c]:.1f}"
                                                         for c in cs) + " | |")
    lines.append(f"| best single shape: {s.best_single} | " + " | ".join(
        f"{s.tokens_per_s[s.best_single, c]:.1f} ({s.ratio(s.best_single, c):.2f}x oracle)" for c in cs)
        + f" | {s.geomean(s.best_single):.3f}x oracle |")
    if (s.cast, cs[0]) in cells:
        lines.append(f"| {s.cast} | " + " | ".join(f"**{s.tokens_per_s[s.cast, c]:.1f}**" for c in cs) + " | |")
        lines.append(f"| {s.cast} / oracle | " + " | ".join(f"**{s.ratio(s.cast, c):.3f}**" for c in cs)
                     + f" | {s.geomean(s.cast):.3f} |")
        lines.append(f"| {s.cast} / best single | " + " | ".join(f"{s.ratio(s.cast, c, s.best_single):.3f}" for c in cs)
                     + f" | **{s.geomean(s.cast, s.best_single):.3f}** |")
    measured = list(cells.values()) + list((screen or {}).values())
    differ = sum(cell.differ_from_ar for cell in measured)
    checked = sum(cell.requests for cell in measured)
    cut = sum(r.cut_requests for cell in measured for r in cell.rounds)
    lines += ["", f"Outputs that differ from `ar`'s (greedy, same prompt): {differ} of {checked} requests "
              f"({cut} of them cut at the cell's cutoff, compared on their prefix).", ""]
    every = screen or cells
    lines += [f"## Every cell{' of the screen' if screen else ''}: tokens/s (median over rounds), tokens per step, "
              "nodes verified per step", "",
              "| policy | " + " | ".join(f"c={c}" for c in cs) + " |", "| --- | " + " | ".join("---" for _ in cs) + " |"]
    for policy in dict.fromkeys(p for p, _ in every):
        row = []
        for c in cs:
            cell, t = every[policy, c], every[policy, c].typical
            rate = f"{cell.tokens_per_s:.1f}"
            if s.oracle[c] == policy and screen is None:
                rate = f"**{rate}**"
            row.append(f"{rate} ({t.mean_accepted_length:.2f}, {t.verified_nodes_per_step:.1f})")
        lines.append(f"| {policy} | " + " | ".join(row) + " |")
    if same:
        lines += ["", "Not measured again, the same tree as another cell: "
                  + ", ".join(f"{a} = {b}" for a, b in same.items()) + "."]
    lines += ["", "## The trees: CAST's against the oracle's (the median round's step medians)", "",
              "| concurrency | policy | tok/s | tokens/step | expanded | verified | depth | step ms | draft model ms "
              "| verify model ms | RPC + orchestrator ms |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in cs:
        for policy in dict.fromkeys([s.oracle[c], s.best_single, *([s.cast] if (s.cast, c) in cells else [])]):
            t = cells[policy, c].typical
            lines.append(f"| {c} | {policy} | {cells[policy, c].tokens_per_s:.1f} | {t.mean_accepted_length:.2f} | "
                         f"{t.expanded_nodes_per_step:.1f} | {t.verified_nodes_per_step:.1f} | "
                         f"{t.verified_depth_per_step:.2f} | {t.step_ms_p50:.1f} | {t.draft_model_ms_p50:.1f} | "
                         f"{t.verify_model_ms_p50:.1f} | {t.overhead_ms_p50:.1f} |")
    if (s.cast, cs[0]) in cells:
        lines += ["", why_section(cells, s)]
    return "\n".join(lines) + "\n"


def why_section(cells: dict[tuple[str, int], Cell], s: Summary) -> str:
    """Per concurrency, CAST's trees beside the oracle's and the cost model's predicted step time against the
    measured one (the median round's step medians); a cell where CAST misses MISS_RATIO of the oracle is marked."""
    lines = ["## Why CAST misses: its trees against the oracle's, predicted against measured step time", "",
             f"Per step medians. predicted: the cost model's price of the step's Expand + Verify before it ran; "
             f"measured: their walls as the orchestrator waited; ratio: the median of measured / predicted per step; "
             f"Expand and Verify: the same ratio per call, over the drafted steps. "
             f"MISS: {s.cast} under {MISS_RATIO}x the oracle's tokens/s.", "",
             "| concurrency | policy | tok/s | / oracle | verified nodes | depth | tokens/step | predicted ms "
             "| measured ms | measured / predicted | Expand | Verify |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in s.concurrency:
        miss = s.ratio(s.cast, c) < MISS_RATIO
        for policy, label in ((s.cast, f"{s.cast} (MISS)" if miss else s.cast), (s.oracle[c], f"oracle: {s.oracle[c]}")):
            t = cells[policy, c].typical
            lines.append(f"| {c} | {label} | {cells[policy, c].tokens_per_s:.1f} | {s.ratio(policy, c):.3f} | "
                         f"{t.verified_nodes_p50:g} | {t.verified_depth_p50:g} | {t.accepted_tokens_p50:g} | "
                         f"{t.predicted_ms_p50:.1f} | {t.measured_ms_p50:.1f} | {t.measured_over_predicted_p50:.2f} | "
                         f"{t.draft_over_predicted_p50:.2f} | {t.verify_over_predicted_p50:.2f} |")
    return "\n".join(lines)


def plot(cells: dict[tuple[str, int], Cell], s: Summary, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(p for p, _ in cells))
    fig, axes = plt.subplots(1, len(s.concurrency), figsize=(5 * len(s.concurrency), 0.22 * len(policies) + 1.5),
                             sharey=True, squeeze=False)
    for ax, c in zip(axes[0], s.concurrency):
        ratios = [s.ratio(p, c) for p in policies]
        colours = ["tab:red" if p == s.cast else "tab:green" if p == s.best_single else "tab:blue" for p in policies]
        ax.barh(range(len(policies)), ratios, color=colours)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.axvline(0.97, color="grey", lw=0.8, ls="--")
        ax.set_title(f"concurrency {c}: oracle {s.oracle[c]} {s.tokens_per_s[s.oracle[c], c]:.0f} tok/s", fontsize=9)
        ax.set_xlabel("tokens/s / oracle's")
        ax.set_xlim(0, max(1.1, max(ratios) * 1.05))
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(policies)), policies, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{title} (red: {s.cast}, green: best single shape {s.best_single})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_requests(spec: str, concurrency: list[int]) -> dict[int, int]:
    """`auto`: max(8, c) per concurrency c; one int for all; or one per concurrency."""
    if spec == "auto":
        return {c: max(8, c) for c in concurrency}
    values = [int(v) for v in spec.split(",")]
    if len(values) == 1:
        values *= len(concurrency)
    if len(values) != len(concurrency):
        raise SystemExit("--requests: one value, or one per concurrency")
    return dict(zip(concurrency, values))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cast sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", default="127.0.0.1:50051")
    p.add_argument("--policies", default="ar,grid,cast",
                   help="comma list of policies and fixed shapes (chain:D, tree:KxD/N); `grid`: the issue's grid")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--prompts", default="humaneval", help="'humaneval' or a JSONL file with a 'prompt' field")
    p.add_argument("--first-prompt", type=int, default=0, help="skip this many prompts of the set")
    p.add_argument("--rstrip-prompts", action="store_true", help="strip trailing whitespace from prompts")
    p.add_argument("--requests", default="auto", help="requests per cell: auto (max(8, c)), N, or N1,N2,.. per concurrency")
    p.add_argument("--seconds", type=float, default=60.0, help="no request of a cell starts after this many seconds")
    p.add_argument("--cutoff", type=float, default=0.0,
                   help="seconds after which a cell's requests still streaming are cancelled; their tokens so far "
                        "count (and are checked against ar's prefix); 0: requests in flight finish")
    p.add_argument("--rounds", type=int, default=2, help="visits of every cell (tokens/s: the median)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--warmup-tokens", type=int, default=0,
                   help="before each cell, one wave of requests this long, untimed (0: none)")
    p.add_argument("--cast-policy", default="cast", help="the adaptive policy judged against the oracle")
    p.add_argument("--confirm", type=int, default=CONFIRM,
                   help="measure again the screen's best K fixed shapes per concurrency, its best K single shapes "
                        "and the adaptive policy, and judge on that (0: judge on the screen)")
    p.add_argument("--confirm-rounds", type=int, default=0, help="the confirmation's rounds (0: as --rounds)")
    p.add_argument("--confirm-requests", default="",
                   help="the confirmation's requests per cell, as --requests (empty: as --requests)")
    p.add_argument("--out", type=Path, default=Path("sweep-out"))
    p.add_argument("--title", default="cast sweep")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    policies, same = expand_policies(a.policies)
    concurrency = [int(c) for c in a.concurrency.split(",")]
    requests = parse_requests(a.requests, concurrency)
    confirm_requests = parse_requests(a.confirm_requests, concurrency) if a.confirm_requests else requests
    prompts = load_prompts(a.prompts)[a.first_prompt:]
    if a.rstrip_prompts:
        prompts = [q.rstrip() for q in prompts]
    most = max(*requests.values(), *confirm_requests.values())
    if len(prompts) < most:
        raise SystemExit(f"{len(prompts)} prompts, fewer than the {most} requests of a cell")
    print(f"{len(policies)} policies x {len(concurrency)} concurrencies x {a.rounds} rounds; requests per cell "
          f"{requests}", file=sys.stderr)
    log = functools.partial(print, file=sys.stderr, flush=True)
    cells = run_sweep(a, {c: policies for c in concurrency}, prompts, requests, a.rounds, log=log)
    stages = {"screen": cells}
    a.out.mkdir(parents=True, exist_ok=True)
    if not any(is_fixed(p) for p in policies):
        write_csvs(stages, a.out)
        print(f"no fixed shape measured: no oracle; {a.out / 'sweep.csv'}")
        return 0
    screen = None
    if a.confirm > 0:
        plan = confirm_plan(cells, concurrency, a.confirm, a.cast_policy)
        print(f"confirmation: {plan}", file=sys.stderr)
        screen, cells = cells, run_sweep(a, plan, prompts, confirm_requests, a.confirm_rounds or a.rounds,
                                         "confirm ", log)
        stages["confirm"] = cells
    write_csvs(stages, a.out)
    summary = summarize(cells, concurrency, a.cast_policy)
    text = markdown(cells, summary, same, a.title, screen)
    (a.out / "sweep.md").write_text(text)
    try:
        seen = screen or cells  # the plot: every cell of the screen, against the screen's own oracle
        plot(seen, summarize(seen, concurrency, a.cast_policy), a.out / "sweep.png", a.title)
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
