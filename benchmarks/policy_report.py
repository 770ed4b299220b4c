"""Compare tree policies, and sweep CAST's thresholds, on a running pair of draft and verify services.

    python -m benchmarks.policy_report --target models/reference/target --draft models/reference/draft \
        --prompts 20 --max-new-tokens 128 --out policies.md [--sweep]

It starts the draft and verify services once, then one orchestrator per configuration (policies share one
orchestrator; each CAST threshold setting gets its own). Requests run one at a time (batch 1), interleaved across
configurations prompt by prompt, so that a noisy machine slows every configuration alike; the report compares
medians of whole-request times measured in the same run, and checks that every configuration produced the same
tokens (greedy decoding is lossless whatever the tree).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cast.v1 import generation_pb2, generation_pb2_grpc
from cast_models.humaneval import load_prompts
from orchestrator.stack import Stack, StackSpec, free_ports, is_serving


@dataclass
class Config:
    label: str
    policy: str
    orchestrator_args: tuple[str, ...] = ()
    times: list[float] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)
    verified: list[float] = field(default_factory=list)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def start_orchestrator(spec: StackSpec, args: tuple[str, ...], port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "orchestrator.server", "--tokenizer", str(spec.target_dir), "--port", str(port),
           "--draft", f"{spec.host}:{spec.draft_port}", "--verify", f"{spec.host}:{spec.verify_port}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not is_serving(f"127.0.0.1:{port}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"orchestrator {args} did not start")
        time.sleep(0.3)
    return proc


def sweep_configs() -> list[Config]:
    out = []
    for c1 in (1.0, 4.0):
        for c2 in (1.0, 3.0):
            for c3 in (1.0, 2.5):
                out.append(Config(f"cast C1={c1:g} C2={c2:g} C3={c3:g}", "cast",
                                  ("--cast-c1", str(c1), "--cast-c2", str(c2), "--cast-c3", str(c3))))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=Path, default=Path("models/reference/target"))
    p.add_argument("--draft", type=Path, default=Path("models/reference/draft"))
    p.add_argument("--verify-dtype", default="auto")
    p.add_argument("--prompts", type=int, default=20, help="HumanEval prompts, in file order")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sweep", action="store_true", help="also sweep C1/C2/C3 of the cast policy over a small grid")
    p.add_argument("--settings", default="", help="also these cast settings, e.g. '1:1:1,1:3:1' (C1:C2:C3)")
    p.add_argument("--out", type=Path, default=Path("policies.md"))
    a = p.parse_args(argv)

    configs = [Config(name, name) for name in ("cast", "eagle2", "chain", "ar")]
    if a.sweep:
        configs += sweep_configs()
    for setting in filter(None, a.settings.split(",")):
        c1, c2, c3 = setting.split(":")
        configs.append(Config(f"cast C1={c1} C2={c2} C3={c3}", "cast", ("--cast-c1", c1, "--cast-c2", c2, "--cast-c3", c3)))
    prompts = [q.rstrip("\n") for q in load_prompts()[: a.prompts]]  # see the model card on trailing newlines
    ports = free_ports(3 + len(configs))
    spec = StackSpec(a.target, a.draft, port=ports[0], draft_port=ports[1], verify_port=ports[2],
                     verify_dtype=a.verify_dtype, log_dir=Path("/tmp/policy-report-logs"))
    started = time.time()
    with Stack(spec) as stack:
        stack.wait_ready(900)
        # One orchestrator per distinct set of flags; the policies without flags share the stack's own.
        orchestrators: dict[tuple[str, ...], tuple[str, subprocess.Popen | None]] = {(): (spec.address, None)}
        for i, c in enumerate(configs):
            if c.orchestrator_args not in orchestrators:
                port = ports[3 + i]
                orchestrators[c.orchestrator_args] = (f"127.0.0.1:{port}", start_orchestrator(spec, c.orchestrator_args, port))
        channels = {args: grpc.insecure_channel(addr) for args, (addr, _) in orchestrators.items()}
        stubs = {args: generation_pb2_grpc.GenerationServiceStub(ch) for args, ch in channels.items()}
        try:
            for c in configs:  # warm-up: one short request each
                stubs[c.orchestrator_args].Generate(generation_pb2.GenerateRequest(prompt=prompts[0], max_new_tokens=8, policy=c.policy))
            for i, prompt in enumerate(prompts):
                for c in configs:
                    request = generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=a.max_new_tokens, policy=c.policy,
                                                             return_step_stats=True)
                    t0 = time.perf_counter()
                    r = stubs[c.orchestrator_args].Generate(request, timeout=600)
                    c.times.append(time.perf_counter() - t0)
                    c.tokens.append(list(r.token_ids))
                    c.accepted.append(r.stats.mean_accepted_length)
                    c.verified.append(statistics.mean(s.verified_nodes for s in r.stats.step_stats))
                print(f"prompt {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)
        finally:
            for ch in channels.values():
                ch.close()
            for _, proc in orchestrators.values():
                if proc is not None:
                    proc.terminate()
    write_report(a, configs, prompts, time.time() - started)
    return 0


def write_report(a, configs: list[Config], prompts: list[str], wall_s: float) -> None:
    ar = next(c for c in configs if c.label == "ar")
    ar_median = statistics.median(ar.times)
    lossless = all(c.tokens == ar.tokens for c in configs)
    rows = []
    for c in configs:
        med = statistics.median(c.times)
        tokens = sum(len(t) for t in c.tokens)
        rows.append((c.label, med, ar_median / med, tokens / sum(c.times), statistics.mean(c.accepted),
                     statistics.mean(c.verified), c.tokens == ar.tokens))
    head = [r for r in rows if not r[0].startswith("cast C")]
    sweep = sorted((r for r in rows if r[0].startswith("cast C")), key=lambda r: r[1])
    lines = [
        "# Tree policies at batch 1 on the CPU",
        "",
        f"Date: {datetime.date.today().isoformat()}. Device: {cpu_name()}, {__import__('os').cpu_count()} cores (CPU only).",
        f"Pair: target `{a.target}`, draft `{a.draft}` (verifier dtype {a.verify_dtype}); {len(prompts)} HumanEval "
        f"prompts (trailing newline stripped), greedy, {a.max_new_tokens} new tokens; requests one at a time, "
        f"configurations interleaved prompt by prompt. Whole run: {wall_s:.0f} s.",
        "",
        "Command:",
        "",
        "    python -m benchmarks.policy_report " + " ".join(sys.argv[1:]),
        "",
        f"Lossless: every configuration produced exactly the tokens of `ar` on every prompt: **{lossless}**.",
        "",
        "| policy | median request (s) | speedup over ar (medians) | tokens/s | tokens per step | nodes verified per step | same tokens as ar |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.2f}x | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.1f} | {r[6]} |" for r in head]
    if sweep:
        lines += [
            "",
            "## CAST threshold sweep (same run)",
            "",
            "Sorted by median request time. C1 breadth, C2 depth, C3 reranking; R = 8.",
            "",
            "| setting | median request (s) | speedup over ar | tokens/s | tokens per step | nodes verified per step |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.2f}x | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.1f} |" for r in sweep]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
