"""Does lookup's match run (cast_core/lookup.py match_run: how far back the text agrees with the earlier occurrence
lookup copies from) predict how many of lookup's tokens the target accepts? The cascade's copying threshold
(orchestrator/cascade.py COPYING) was chosen from this table, on prompts the benchmarks do not use: HumanEval
100-123 and edit prompts 64-87 (benchmarks/cascade_report.py runs the first ones). Greedy outputs of the target.

    python -m benchmarks.lookup_signal [--prompts 24] [--target models/reference/target]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.cascade_report import edit_prompts
from cast_core.lookup import lookup_chain, match_run
from cast_models.humaneval import load_prompts
from orchestrator.stack import REFERENCE_PAIR

RUNS = ((0, 0), (1, 1), (2, 2), (3, 3), (4, 5), (6, 7), (8, 15), (16, 32))


def accepted_by_run(model, tokenizer, prompts: list[str], new_tokens: int, chain: int) -> list[tuple[int, int]]:
    """(match run, lookup tokens accepted) at each position of each prompt's greedy output."""
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0].numpy()
        for i in range(ids.shape[1], len(out) - 1):
            proposed, actual = lookup_chain(out[:i], chain), out[i: i + chain]
            agree = np.cumprod(proposed[: len(actual)] == actual[: len(proposed)])
            rows.append((match_run(out[:i], 32), int(agree.sum())))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=str(REFERENCE_PAIR / "target"))
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--chain", type=int, default=8)
    a = p.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(a.target)
    model = AutoModelForCausalLM.from_pretrained(a.target, dtype=torch.float32).eval()
    sets = {"humaneval": [q.rstrip() for q in load_prompts()][100: 100 + a.prompts],
            "edit": edit_prompts(64 + a.prompts)[64:]}
    print(f"| set | match run | positions | lookup tokens accepted (of {a.chain}) | share with 2+ |")
    print("| --- | --- | --- | --- | --- |")
    for name, prompts in sets.items():
        rows = np.array(accepted_by_run(model, tokenizer, prompts, a.new_tokens, a.chain))
        for lo, hi in RUNS:
            accepted = rows[(rows[:, 0] >= lo) & (rows[:, 0] <= hi), 1]
            if accepted.size:
                share = (accepted >= 2).mean()
                print(f"| {name} | {lo}-{hi} | {accepted.size} | {accepted.mean():.2f} | {share:.2f} |")


if __name__ == "__main__":
    main()
