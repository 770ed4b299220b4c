"""What a prompt of a length not seen before costs, against one seen: the draft's prompt commit (fixed buffers)
and the verifier's prefill, each over 32 prompts of distinct lengths, twice. On a GPU machine:

    python -m benchmarks.prompt_length_costs --target /tmp/wide-8b --draft models/reference/draft

Prints the median and max ms of each pass; the first pass meets every length for the first time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cast_runtime.sessions import SessionStore
from draft_service.expansion import Budget, Expander, SequenceInput
from draft_service.export import export_draft
from draft_service.runner import DraftRunner
from verify_service.target import TargetModel
from verify_service.verifier import PrefillItem, Verifier

LENGTHS = range(100, 132)


def report(name: str, passes: list[list[float]]) -> None:
    for i, times in enumerate(passes):
        print(f"{name}, pass {i}: median {np.median(times):.2f} ms, max {max(times):.2f}, first {times[:4]}",
              flush=True)


def draft_commits(draft: str, rng: np.random.Generator) -> list[list[float]]:
    path, meta = export_draft(draft, top_k=8, dtype="float16")
    runner = DraftRunner(path, meta, provider="cuda")
    runner.warm((1,))
    expander = Expander(runner, SessionStore(256, 1e9), meta.max_context)
    passes = []
    for p in range(2):
        times = []
        for n in LENGTHS:
            sid = f"d{p}-{n}"
            start = time.perf_counter()
            expander.expand([SequenceInput(sid, rng.integers(0, meta.vocab_size, n), 0)], Budget(8, 0, 8))
            times.append((time.perf_counter() - start) * 1e3)
            expander.release([sid])
        passes.append(times)
    return passes


def verify_prefills(target: str, rng: np.random.Generator) -> list[list[float]]:
    model = TargetModel.load(target, dtype="bfloat16", device="cuda", max_context=2048)
    verifier = Verifier(model, max_batch=32, session_ttl_s=1e9, max_tree_tokens=128)
    verifier.warm_up()
    passes = []
    for p in range(2):
        times = []
        for n in LENGTHS:
            sid = f"v{p}-{n}"
            torch.cuda.synchronize()
            start = time.perf_counter()
            verifier.prefill([PrefillItem(sid, rng.integers(0, model.vocab_size, n).tolist())])
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
            verifier.release([sid])
        passes.append(times)
    return passes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prompt_length_costs", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="target checkpoint (CUDA)")
    p.add_argument("--draft", default="models/reference/draft", help="draft checkpoint (ONNX Runtime CUDA)")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    report("draft prompt commit", draft_commits(a.draft, rng))
    report("verify prefill", verify_prefills(a.target, rng))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
