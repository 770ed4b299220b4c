"""Memory and step time of a draft runner whose bucket sessions share one copy of the weights (runner.py).

    python -m benchmarks.shared_weights --model DIR --batches 1,2,4,8 --out shared_weights.json

DIR: a draft checkpoint (exported first, cached as draft_step.py does) or an exported draft (model.onnx and
meta.json, as export.py caches it). Reads the memory in use (on CUDA the GPU's: torch.cuda.mem_get_info, else
nvidia-smi; on CPU the process's resident memory) before the runner, after its start (the weights, read once, and the
flexible session) and after capturing every token bucket of these batch buckets (a session each, as the server warms
up), then times draft_step.py's Expand at batch 1. A session that loaded its own weights would add a copy of them:
the memory per bucket session is printed beside the weights' size.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
from pathlib import Path

import onnxruntime as ort

from benchmarks.draft_step import time_expand
from draft_service.expansion import Budget
from draft_service.export import META_FILE, MODEL_FILE, export_draft, load_meta
from draft_service.profile import device_name
from draft_service.runner import PROVIDERS, DraftRunner, choose_dtype, choose_provider


def used_mib(provider: str) -> float:
    if provider != PROVIDERS["cuda"]:
        # glibc keeps much of the heap that a session's start frees (it parses the whole model file) resident.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    try:
        import torch

        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20
    except (ImportError, RuntimeError):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", visible],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return float(out.split()[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shared_weights", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path, help="draft checkpoint or exported draft directory")
    p.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16"), help="of a checkpoint's export")
    p.add_argument("--batches", default="1,2,4,8,16,32", help="batch buckets warmed (the server warms every one)")
    p.add_argument("--capacity", type=int, default=0, help="KV buffer columns (0: the model's context + tree room)")
    p.add_argument("--context", type=int, default=256, help="committed tokens before the timed tree's root")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--breadth", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cache-dir", type=Path, default=None, help="export cache ($CAST_CACHE_DIR by default)")
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    a = p.parse_args(argv)
    provider = choose_provider(a.provider)
    if (a.model / META_FILE).exists():
        onnx_path, meta = a.model / MODEL_FILE, load_meta(a.model)
    else:
        onnx_path, meta = export_draft(a.model, top_k=a.top_k, dtype=choose_dtype(a.dtype, provider),
                                       cache_dir=a.cache_dir)
    mib = {"before": used_mib(provider)}
    runner = DraftRunner(onnx_path, meta, provider=provider, capacity=a.capacity, fixed_buffers=True)
    mib["started"] = used_mib(provider)
    runner.warm(tuple(int(b) for b in a.batches.split(",")))
    mib["warm"] = used_mib(provider)
    weights = sum(v.tensor_size_in_bytes() for v in runner.weights.values()) / 2**20
    kv = sum(v.tensor_size_in_bytes() for b in runner.buffers.values() for s in b.sets for v in s) / 2**20
    per_session = (mib["warm"] - mib["started"] - kv) / len(runner.buckets)
    budget = Budget(top_k=a.top_k, max_depth=a.depth, max_breadth=a.breadth)
    step = time_expand(runner, 1, a.context, 1, budget, a.repeats, a.warmup)
    print(f"{a.model} on {device_name(provider)} ({runner.backend}, {meta.dtype}), onnxruntime {ort.__version__}")
    print(f"weights: {weights:.0f} MiB in {len(runner.weights)} tensors, read once")
    print(f"memory in use, MiB: {mib['before']:.0f} before, {mib['started']:.0f} with the runner started, "
          f"{mib['warm']:.0f} with {len(runner.buckets)} bucket sessions warmed (their KV buffers: {kv:.0f})")
    print(f"per bucket session: {per_session:.0f} MiB besides its KV buffers (a copy of the weights: {weights:.0f})")
    print(f"Expand at batch 1, depth {a.depth}, top-k {a.top_k}, breadth {a.breadth}, context {a.context}: "
          f"median {step['median_ms']:.2f} ms (model {step['model_median_ms']:.2f} ms), {step['nodes_per_tree']} nodes")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({
            "model": str(a.model), "device": device_name(provider), "backend": runner.backend,
            "onnxruntime": ort.__version__, "weights_mib": weights, "weight_tensors": len(runner.weights),
            "memory_mib": mib, "kv_mib": kv, "bucket_sessions": len(runner.buckets),
            "per_session_mib": per_session, "step": step,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
