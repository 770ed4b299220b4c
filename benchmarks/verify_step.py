"""Time one Verify step in process: the service's forward, and optionally transformers' own on the same weights.

    python -m benchmarks.verify_step --model DIR --batch 1,8 --tokens 1,8,16,32,64 --dtype bfloat16 \
        --context 256 --forwards service,transformers --out step.json [--torch-profile step.txt]

For each forward (--forwards: `service`, what the verify service runs: our fused Llama forward where it applies,
its kernels compiled on CUDA, else transformers'; `transformers`, transformers' own forward, the tests' oracle),
each batch size B and each tree size n: B sequences are prefilled with `context` random tokens, then
Verifier.verify runs on a tree of n nodes per sequence (a binary tree, or a chain with --shape chain), `warmup`
times (CUDA graphs are captured there), then `repeats` timed times. After every step each sequence is rewound to
its prefilled state, so every repeat runs on the same context and the same shapes. Timings are bracketed by
torch.cuda.synchronize() on CUDA. `verify_ms`: the whole step (forward, target tokens, acceptance, KV
compaction); `forward_ms`: the tree forward alone.

--torch-profile FILE writes torch.profiler tables (top 30 by self CUDA time and by self CPU time) of 10 steps at
the smallest batch and the tree size nearest 32, per forward: where a step's time goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cast_core.tree import TokenTree
from verify_service.target import TargetModel, device_name
from verify_service.verifier import PrefillItem, Session, Verifier, VerifyItem

FORWARDS = ("service", "transformers")
DEFAULT_MAX_CONTEXT = 2048


def tree_of(root: int, n: int, shape: str, rng: np.random.Generator, vocab_size: int) -> TokenTree:
    """n nodes under `root`: a binary tree (node i's parent (i - 1) // 2) or a chain; random tokens."""
    parents = [-1] + [(i - 1) // 2 if shape == "tree" else i - 1 for i in range(1, n)]
    depths = [0] * n
    for i in range(1, n):
        depths[i] = depths[parents[i]] + 1
    tokens = [root] + rng.integers(0, vocab_size, n - 1).tolist()
    return TokenTree.from_lists(tokens, parents, depths, [1.0] * n)




def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Case:
    """B prefilled sequences and their trees of n nodes; step() runs one Verify and rewinds every sequence."""

    def __init__(self, verifier: Verifier, sessions: list[Session], trees: list[TokenTree]) -> None:
        self.verifier = verifier
        self.sessions = sessions
        self.items = [VerifyItem(f"s{b}", tree) for b, tree in enumerate(trees)]
        self.lengths = [s.kv.length for s in sessions]
        self.roots = [s.pending for s in sessions]

    def step(self) -> None:
        self.verifier.verify(self.items)
        for session, length, root in zip(self.sessions, self.lengths, self.roots, strict=True):
            session.kv.length, session.pending = length, root  # what keep() moved there is simply overwritten

    def forward(self) -> None:
        self.verifier.static.tree_logits([s.kv for s in self.sessions], [item.tree for item in self.items])


def timed(fn, repeats: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    millis = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        millis.append((time.perf_counter() - start) * 1e3)
    return millis


def summary(millis: list[float]) -> dict[str, float]:
    q = np.percentile(millis, [10, 50, 90])
    return {"median": statistics.median(millis), "p10": float(q[0]), "p90": float(q[2]), "min": min(millis)}


def torch_profile_table(case: Case, device: torch.device, steps: int = 10) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    case.step()
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            case.step()
        sync(device)
    averages = prof.key_averages()
    tables = []
    if device.type == "cuda":
        tables.append("sorted by self CUDA time\n" + averages.table(sort_by="self_device_time_total", row_limit=30))
    tables.append("sorted by self CPU time\n" + averages.table(sort_by="self_cpu_time_total", row_limit=30))
    return "\n".join(tables)


def fixed_case_logits(verifier: Verifier, args: argparse.Namespace, n: int) -> torch.Tensor:
    """Logits [n, V] (float32, host) of one fixed tree over one fixed context, the same for every forward: what
    their agreement is measured on."""
    vocab_size = verifier.target.vocab_size
    rng = np.random.default_rng(args.seed + 1)
    verifier.prefill([PrefillItem("check", rng.integers(0, vocab_size, args.context + 1).tolist())])
    session = verifier.sessions.get("check")
    tree = tree_of(session.pending, n, args.shape, rng, vocab_size)
    logits = verifier.static.tree_logits([session.kv], [tree])[0].float().cpu()
    verifier.release(["check"])
    return logits


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    return {"max_abs_diff": float((logits - reference).abs().max()),
            "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean())}


def profile_mode(target: TargetModel, mode: str, args: argparse.Namespace, rng: np.random.Generator, slots: int,
                 max_tree_tokens: int, profile_tokens: int) -> tuple[list[dict], dict, list[str], torch.Tensor]:
    """Every (batch, tokens) cell of one forward: (result rows, the verifier's summary, torch.profiler tables, the
    fixed case's logits)."""
    device = target.device
    verifier = Verifier(target, max_batch=slots, session_ttl_s=3600, max_tree_tokens=max_tree_tokens)
    logits = fixed_case_logits(verifier, args, profile_tokens)
    rows, tables = [], []
    for batch in args.batch:
        ids = [f"s{b}" for b in range(batch)]
        prompts = [rng.integers(0, target.vocab_size, args.context + 1).tolist() for _ in ids]
        verifier.prefill([PrefillItem(s, p) for s, p in zip(ids, prompts)])  # KV: `context` entries each
        sessions = [verifier.sessions.get(s) for s in ids]
        for n in args.tokens:
            trees = [tree_of(s.pending, n, args.shape, rng, target.vocab_size) for s in sessions]
            case = Case(verifier, sessions, trees)
            verify_ms = timed(case.step, args.repeats, args.warmup, device)
            forward_ms = timed(case.forward, args.repeats, args.warmup, device)
            row = {"mode": mode, "batch": batch, "tokens": n, "verify_ms": summary(verify_ms),
                   "forward_ms": summary(forward_ms)}
            rows.append(row)
            print(f"{mode:>16} B={batch:<3} n={n:<4} verify {row['verify_ms']['median']:8.2f} ms "
                  f"(p10 {row['verify_ms']['p10']:.2f}, p90 {row['verify_ms']['p90']:.2f})   forward "
                  f"{row['forward_ms']['median']:8.2f} ms", flush=True)
            if args.torch_profile and batch == min(args.batch) and n == profile_tokens:
                tables.append(f"=== mode {mode}, B={batch}, n={n}, context {args.context} ===\n"
                              + torch_profile_table(case, device))
        verifier.release(ids)
    static = verifier.static
    layout = {"layout": static.describe(), "graphs": sum(g is not None for g in static.graphs.values()),
              "capture_failures": static.capture_failures}
    return rows, layout, tables, logits


def run(args: argparse.Namespace) -> dict:
    target = TargetModel.load(args.model, dtype=args.dtype, device=args.device, max_context=args.max_context)
    fused = target.fused  # None where the fused forward does not apply: then both forwards are transformers'
    if args.max_context is None:  # the model's limit can be far too many KV columns for a static layout
        target.max_context = min(target.max_context, DEFAULT_MAX_CONTEXT)
    if args.context + max(args.tokens) + 1 > target.max_context:
        raise SystemExit(f"--context {args.context} + the largest tree exceed max_context {target.max_context}")
    device = target.device
    rng = np.random.default_rng(args.seed)
    slots = max(args.batch)
    max_tree_tokens = max(args.max_tree_tokens, max(args.tokens))
    profile_tokens = min(args.tokens, key=lambda n: abs(n - 32))
    results, modes, profiles, reference = [], {}, [], None
    for mode in args.forwards:
        target.fused = fused if mode == "service" else None  # the fused forward shares the model's weights
        rows, modes[mode], tables, logits = profile_mode(target, mode, args, rng, slots, max_tree_tokens,
                                                         profile_tokens)
        # Every forward against the first one, on the same tree and context (bfloat16 kernels round differently).
        reference = logits if reference is None else reference
        modes[mode]["agreement_with_first_mode"] = agreement(logits, reference)
        print(f"{mode}: logits vs the first forward {modes[mode]['agreement_with_first_mode']}", flush=True)
        results += rows
        profiles += tables
        gc.collect()  # the verifier's store, graphs and pool go before the next one allocates its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
    target.fused = fused
    report = {
        "device": device_name(device), "model": str(args.model), "dtype": target.dtype_name,
        "attn_implementation": target.attn_implementation, "context": args.context, "max_context": target.max_context,
        "shape": args.shape, "repeats": args.repeats, "warmup": args.warmup, "torch": torch.__version__,
        "modes": modes, "results": results,
    }
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.torch_profile:
        Path(args.torch_profile).write_text("\n\n".join(profiles) + "\n")
    return report


def print_table(results: list[dict]) -> None:
    modes = list(dict.fromkeys(r["mode"] for r in results))
    cells = {(r["mode"], r["batch"], r["tokens"]): r["verify_ms"]["median"] for r in results}
    keys = list(dict.fromkeys((r["batch"], r["tokens"]) for r in results))
    print("\nVerify step, median ms")
    print(f"{'B':>4} {'n':>5} " + " ".join(f"{m:>16}" for m in modes))
    for batch, n in keys:
        print(f"{batch:>4} {n:>5} " + " ".join(f"{cells.get((m, batch, n), float('nan')):16.2f}" for m in modes))


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def choice_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        picked = [x for x in text.split(",") if x]
        for x in picked:
            if x not in choices:
                raise argparse.ArgumentTypeError(f"{x!r} is not one of {', '.join(choices)}")
        return picked
    return parse


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.verify_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="target checkpoint directory")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", type=int_list, default=[1, 8], help="batch sizes, e.g. 1,8")
    p.add_argument("--tokens", type=int_list, default=[1, 8, 16, 32, 64], help="tree sizes, e.g. 1,8,16,32,64")
    p.add_argument("--context", type=int, default=256, help="tokens in every sequence's KV")
    p.add_argument("--max-context", type=int, default=None,
                   help=f"the verifier's context limit (KV columns = max_context + tree room); "
                        f"default the model's limit, at most {DEFAULT_MAX_CONTEXT}")
    p.add_argument("--max-tree-tokens", type=int, default=128, help="the verifier's tree room")
    p.add_argument("--shape", choices=("tree", "chain"), default="tree")
    p.add_argument("--forwards", type=choice_list(FORWARDS), default=["service"],
                   help="forwards: service, transformers")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON report")
    p.add_argument("--torch-profile", type=Path, help="torch.profiler tables for the smallest batch, n nearest 32")
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(build_arg_parser().parse_args(argv))


if __name__ == "__main__":
    main()
