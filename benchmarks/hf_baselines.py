"""Peer baselines: transformers' own `generate()` and assisted generation on the same pair (reports/gpu-8b-target/).

    python -m benchmarks.hf_baselines --target DIR --draft DIR --prompts 10 --max-new-tokens 128 \
        --batch 1,8 --dtype bfloat16 --device cuda --out FILE.json [--md FILE.md]

What a user would run instead of CAST Serve, in one process, with transformers' defaults:
- `generate`: greedy `model.generate()` at each `--batch` size (left padding and an attention mask above 1);
- `assisted`: greedy `model.generate(assistant_model=draft)` at batch 1, the only batch size transformers'
  assisted generation accepts; the draft's schedule is whatever transformers ships (recorded in the output).

Prompts: the first N HumanEval prompts with the trailing newline stripped (see the reference pair's model card),
encoded without special tokens as the orchestrator does. Every call generates exactly --max-new-tokens tokens
(min_new_tokens = max_new_tokens, so EOS is masked until the limit) so that per-token rates compare with
`cast bench`; --stop-at-eos lets EOS end a sequence instead. Each mode is warmed up once, untimed; each timed call
sits between torch.cuda.synchronize() calls. Batch-1 `generate` and `assisted` run interleaved prompt by prompt,
and the tool checks that greedy assisted output equals plain `generate` output on every prompt (bf16 may differ:
mismatches are counted, not fatal).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from cast_models.humaneval import load_prompts

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ASSISTED_NOTE = "transformers' assisted generation supports batch size 1 only (ValueError above 1)"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + " (CPU)"
    except OSError:
        pass
    return (platform.processor() or "unknown") + " (CPU)"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def load_pair(target_dir: str, draft_dir: str, dtype: str, device: str):
    """(tokenizer, target, draft), each model loaded once in `dtype` and moved to `device`."""
    tok = AutoTokenizer.from_pretrained(target_dir)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    models = []
    for path in (target_dir, draft_dir):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
        models.append(model)
    return tok, models[0], models[1]


def assistant_settings(draft) -> dict:
    """The draft schedule assisted generation will use: the draft's generation config over transformers' defaults."""
    get_defaults = getattr(GenerationConfig, "_get_default_generation_params", None)  # private; 5.17 and 5.24 have it
    defaults = get_defaults() if get_defaults else {}
    out = {}
    for key in ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold"):
        value = getattr(draft.generation_config, key, None)
        out[key] = defaults.get(key) if value is None else value
    # With scikit-learn installed, transformers re-fits the confidence threshold during each call (ROC-based).
    out["confidence_threshold_adapts"] = importlib.util.find_spec("sklearn") is not None
    return out


def gen_kwargs(tok, max_new_tokens: int, stop_at_eos: bool) -> dict:
    kw = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    if not stop_at_eos:
        kw["min_new_tokens"] = max_new_tokens  # EOS masked until the limit: every call makes exactly N tokens
    return kw


def new_tokens(out: torch.Tensor, input_len: int, eos_id: int | None) -> list[list[int]]:
    """Each row's generated ids, up to and including the first EOS (padding after it dropped)."""
    rows = []
    for row in out[:, input_len:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        rows.append(row)
    return rows


def timed_call(model, tok, prompts: list[str], kw: dict, device: str, assistant=None) -> tuple[float, list[list[int]]]:
    """One generate() call over `prompts` as one batch: (seconds, generated ids per prompt)."""
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    sync(device)
    t0 = time.perf_counter()
    extra = {"assistant_model": assistant} if assistant is not None else {}
    out = model.generate(**enc, **kw, **extra)
    sync(device)
    seconds = time.perf_counter() - t0
    return seconds, new_tokens(out, enc["input_ids"].shape[1], tok.eos_token_id)


class ForwardCounter:
    """Counts a model's top-level forward calls (for assisted: target verification steps, draft steps)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1


def time_generate(target, tok, prompts: list[str], batch: int, kw: dict, device: str) -> dict:
    """Plain greedy generate() at `batch`: prompts cycled so every call has `batch` rows."""
    n_calls = -(-len(prompts) // batch)
    rows = [prompts[i % len(prompts)] for i in range(n_calls * batch)]
    timed_call(target, tok, rows[:batch], kw, device)  # warm-up
    times, tokens = [], []
    for i in range(n_calls):
        seconds, ids = timed_call(target, tok, rows[i * batch : (i + 1) * batch], kw, device)
        times.append(seconds)
        tokens += ids
    return {"times": times, "tokens": tokens}


def time_batch1(target, draft, tok, prompts: list[str], kw: dict, device: str, modes: list[str]) -> dict:
    """Batch-1 generate and assisted, interleaved prompt by prompt so machine noise hits both alike."""
    res = {m: {"times": [], "tokens": []} for m in modes}
    target_fw, draft_fw = ForwardCounter(target), ForwardCounter(draft)
    try:
        for mode in modes:  # warm-up
            timed_call(target, tok, prompts[:1], kw, device, draft if mode == "assisted" else None)
        steps = drafts = 0
        for prompt in prompts:
            for mode in modes:
                t0, d0 = target_fw.calls, draft_fw.calls
                seconds, ids = timed_call(target, tok, [prompt], kw, device, draft if mode == "assisted" else None)
                res[mode]["times"].append(seconds)
                res[mode]["tokens"] += ids
                if mode == "assisted":
                    steps += target_fw.calls - t0
                    drafts += draft_fw.calls - d0
        if "assisted" in res:
            res["assisted"].update(target_forwards=steps, draft_forwards=drafts)
    finally:
        target_fw.handle.remove()
        draft_fw.handle.remove()
    return res


def time_assisted(target, draft, tok, prompts: list[str], kw: dict, device: str) -> dict:
    """Assisted generation alone at batch 1 (time_batch1 runs it interleaved with generate)."""
    return time_batch1(target, draft, tok, prompts, kw, device, ["assisted"])["assisted"]


def make_row(mode: str, batch: int, res: dict) -> dict:
    tokens = sum(len(t) for t in res["tokens"])
    seconds = sum(res["times"])
    row = {
        "mode": mode,
        "batch": batch,
        "prompts": len(res["tokens"]),  # requests served (batch > 1: prompts cycled to fill the last call)
        "calls": len(res["times"]),
        "tokens": tokens,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 2),
        "median_request_s": round(statistics.median(res["times"]), 4),  # batch > 1: one call serves `batch` requests
    }
    if "target_forwards" in res:
        steps = res["target_forwards"]
        row.update(
            target_forwards=steps,
            draft_forwards=res["draft_forwards"],
            tokens_per_target_forward=round(tokens / steps, 3),
            mean_accepted_draft_tokens=round((tokens - steps) / steps, 3),  # per target forward, bonus token excluded
        )
    return row


def mismatches(a: list[list[int]], b: list[list[int]]) -> list[dict]:
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            first = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            out.append({"prompt": i, "first_diff": first, "len_a": len(x), "len_b": len(y)})
    return out


def write_md(report: dict, path: Path) -> None:
    rows = report["rows"]
    base = next((r for r in rows if r["mode"] == "generate" and r["batch"] == 1), None)
    lines = [
        "# transformers baselines (issue 7)",
        "",
        f"Date: {report['date']}. Device: {report['device']}. torch {report['torch']}, transformers "
        f"{report['transformers']}, dtype {report['dtype']}.",
        f"Target `{report['target']}`, draft `{report['draft']}`. {report['n_prompts']} HumanEval prompts (trailing "
        f"newline stripped), greedy, {report['max_new_tokens']} new tokens; {report['length_rule']}.",
        f"Assisted: {report['assisted']['note']}; draft schedule {json.dumps(report['assisted']['settings'])}.",
        "",
        "| mode | batch | requests | tokens | seconds | tokens/s | median request (s) | vs generate b1 "
        "| tokens per target forward |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        tpf = f"{r['tokens_per_target_forward']:.2f}" if "tokens_per_target_forward" in r else "1"
        lines.append(f"| {r['mode']} | {r['batch']} | {r['prompts']} | {r['tokens']} | {r['seconds']:.3f} | "
                     f"{r['tokens_per_s']:.1f} | {r['median_request_s']:.3f} | {ratio} | {tpf} |")
    checks = report["checks"]
    if "assisted_vs_generate_mismatches" in checks:
        n_bad = checks["assisted_vs_generate_mismatches"]
        lines += ["", f"Greedy assisted == generate at batch 1: {n_bad} mismatching prompts of {report['n_prompts']}."]
    for b, n in checks.get("batch_vs_batch1_mismatches", {}).items():
        lines.append(f"generate at batch {b} vs batch 1: {n} mismatching requests (left padding; bf16 may differ).")
    lines += ["", "Command:", "", "    " + report["command"], ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--prompts", type=int, default=10, help="the first N HumanEval prompts")
    p.add_argument("--humaneval", default=None, help="HumanEval.jsonl.gz (default: $CAST_HUMANEVAL or the package)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", default="1,8", help="batch sizes for plain generate (assisted always runs at 1)")
    p.add_argument("--modes", default="generate,assisted")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stop-at-eos", action="store_true", help="let EOS end a sequence (default: exactly N tokens)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--md", type=Path, default=None)
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batch.split(",") if b.strip()]
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    assert set(modes) <= {"generate", "assisted"}, f"unknown modes {modes}"
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    prompts = [q.rstrip("\n") for q in load_prompts(a.humaneval)[: a.prompts]]  # model card: trailing newline
    t0 = time.perf_counter()
    tok, target, draft = load_pair(a.target, a.draft, a.dtype, a.device)
    load_s = time.perf_counter() - t0
    print(f"loaded in {load_s:.1f} s on {device_name(a.device)}", flush=True)
    kw = gen_kwargs(tok, a.max_new_tokens, a.stop_at_eos)

    b1_modes = [m for m in ("generate", "assisted") if m in modes and (m == "assisted" or 1 in batches)]
    results: dict[tuple[str, int], dict] = {}
    if b1_modes:
        for mode, res in time_batch1(target, draft, tok, prompts, kw, a.device, b1_modes).items():
            results[(mode, 1)] = res
            print(f"{mode} b1: {make_row(mode, 1, res)}", flush=True)
    if "generate" in modes:
        for b in (b for b in batches if b != 1):
            results[("generate", b)] = time_generate(target, tok, prompts, b, kw, a.device)
            print(f"generate b{b}: {make_row('generate', b, results[('generate', b)])}", flush=True)

    checks: dict = {}
    if ("assisted", 1) in results and ("generate", 1) in results:
        bad = mismatches(results[("generate", 1)]["tokens"], results[("assisted", 1)]["tokens"])
        checks.update(assisted_vs_generate_mismatches=len(bad), assisted_mismatch_detail=bad)
    if ("generate", 1) in results:
        ref = results[("generate", 1)]["tokens"]
        checks["batch_vs_batch1_mismatches"] = {
            str(b): len(mismatches([ref[i % len(ref)] for i in range(len(res["tokens"]))], res["tokens"]))
            for (m, b), res in results.items() if m == "generate" and b != 1
        }

    report = {
        "tool": "benchmarks.hf_baselines",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.hf_baselines " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": device_name(a.device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "target": a.target,
        "draft": a.draft,
        "dtype": a.dtype,
        "attn_implementation": getattr(target.config, "_attn_implementation", None),
        "load_s": round(load_s, 2),
        "n_prompts": len(prompts),
        "max_new_tokens": a.max_new_tokens,
        "length_rule": "EOS may end a sequence (--stop-at-eos)" if a.stop_at_eos
        else "min_new_tokens = max_new_tokens: EOS masked, every request generates exactly max_new_tokens",
        "timing": "one warm-up call per mode and batch size, untimed; torch.cuda.synchronize() before and after each "
        "timed call; tokens = generated ids up to and including the first EOS; tokens_per_s = tokens / total seconds",
        "assisted": {"batch_sizes": [1], "note": ASSISTED_NOTE, "settings": assistant_settings(draft)},
        "rows": [make_row(m, b, res) for (m, b), res in results.items()],
        "checks": checks,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    if a.md:
        write_md(report, a.md)
    summary = {k: v for k, v in checks.items() if not k.endswith("detail")}
    print(json.dumps({"rows": report["rows"], "checks": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
