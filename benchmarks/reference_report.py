"""Mean accepted length and Python validity of the reference pair on all HumanEval prompts (issues 3 and 5).

    python -m benchmarks.reference_report --out reference_pair.md

Starts the three services with `models/reference/`, sends every HumanEval prompt (trailing newline stripped: see the
model card) through `Generate` with 128 new tokens, for eagle2 (depth 6) and a chain of 4, greedy, and eagle2 at
temperature 1.0 (seeded). Tokens per step = all committed tokens / all steps. A completion "parses" when the prompt
plus the completion, cut at HumanEval's usual stop sequences and back to its last complete line, is valid Python.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from benchmarks.policy_report import cpu_name
from cast.v1 import generation_pb2, generation_pb2_grpc
from cast_models.humaneval import load_prompts
from orchestrator.stack import REFERENCE_PAIR, Stack, StackSpec, free_ports

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
CONFIGS = [  # label, policy, temperature
    ("eagle2, greedy", "eagle2", 0.0),
    ("chain of 4, greedy", "chain", 0.0),
    ("cast, greedy", "cast", 0.0),
    ("eagle2, temperature 1.0", "eagle2", 1.0),
    ("chain of 4, temperature 1.0", "chain", 1.0),
]


def parses(prompt: str, completion: str) -> bool:
    cut = min((i for i in (completion.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(completion))
    body = completion[:cut]
    if cut == len(completion) and "\n" in body:  # ran out of tokens mid-line: drop the partial line
        body = body[: body.rfind("\n")]
    try:
        ast.parse(prompt + body)
        return True
    except SyntaxError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=164)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("reference_pair.md"))
    a = p.parse_args(argv)
    prompts = [q.rstrip("\n") for q in load_prompts()[: a.prompts]]
    ports = free_ports(3)
    spec = StackSpec(REFERENCE_PAIR / "target", REFERENCE_PAIR / "draft", port=ports[0], draft_port=ports[1],
                     verify_port=ports[2], log_dir=Path("/tmp/reference-report-logs"))
    rows = []
    started = time.time()
    with Stack(spec) as stack, grpc.insecure_channel(spec.address) as channel:
        stack.wait_ready(900)
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        for label, policy, temperature in CONFIGS:
            def run(i: int):
                request = generation_pb2.GenerateRequest(
                    prompt=prompts[i], max_new_tokens=a.max_new_tokens, policy=policy, temperature=temperature, seed=i
                )
                return stub.Generate(request, timeout=900)

            t0 = time.time()
            with ThreadPoolExecutor(a.concurrency) as pool:
                responses = list(pool.map(run, range(len(prompts))))
            tokens = sum(r.usage.completion_tokens for r in responses)
            steps = sum(r.stats.steps for r in responses)
            ok = sum(parses(q, r.text) for q, r in zip(prompts, responses))
            rows.append((label, tokens / steps, ok, tokens, steps, time.time() - t0))
            print(f"{label}: {tokens / steps:.2f} tokens/step, {ok}/{len(prompts)} parse", file=sys.stderr, flush=True)
    lines = [
        "# The reference pair on HumanEval",
        "",
        f"Date: {datetime.date.today().isoformat()}. Device: {cpu_name()} (CPU only), through the three services on "
        f"loopback. Pair: `models/reference/`. {len(prompts)} HumanEval prompts, trailing newline stripped (model card), "
        f"{a.max_new_tokens} new tokens, {a.concurrency} requests at a time. Whole run {time.time() - started:.0f} s.",
        "",
        "Command:",
        "",
        "    python -m benchmarks.reference_report " + " ".join(sys.argv[1:]),
        "",
        "Tokens per step counts every committed token (accepted drafts and the target's bonus token) over every step.",
        "eagle2: top-8 per layer, 8 kept per layer, depth 6, best 32 nodes verified. Chain: 4 draft tokens a step.",
        "",
        "| configuration | mean accepted length (tokens/step) | completions that parse | tokens | steps |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]}/{len(prompts)} | {r[3]} | {r[4]} |" for r in rows]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
