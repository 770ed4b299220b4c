"""In-process A/B of the draft's forward slicing (DraftRunner max_rows): a runner with max_rows=ROWS against one
without a bound (one forward per call), calls alternated A B B A ..., medians; the reference draft on the CPU.

    python benchmarks/draft_slicing_ab.py REPEATS OUT.json [ROWS=256]
 Prefill: B new sequences of L tokens (max_depth 0). Step: draft_step's
EAGLE-2 tree (top-8, depth 6, breadth 8) at context 256, 1 new token."""
import json, sys, time
import numpy as np
from cast_runtime.sessions import SessionStore
from draft_service.expansion import Budget, Expander, SequenceInput
from draft_service.export import export_draft
from draft_service.runner import DraftRunner, TREE_ROOM
onnx_path, meta = export_draft("models/reference/draft", top_k=8, dtype="float32")
rng = np.random.default_rng(0)
arms = {}
ROWS = int(sys.argv[3]) if len(sys.argv) > 3 else 256
for name, rows in (("sliced", ROWS), ("whole", 10**9)):
    r = DraftRunner(onnx_path, meta, provider="cpu", capacity=meta.max_context + TREE_ROOM, threads=1, max_rows=rows)
    arms[name] = Expander(r, SessionStore(1024, 1e9), meta.max_context)
tree = Budget(top_k=8, max_depth=6, max_breadth=8)
def prefill(ex, B, L, i):
    ids = [f"p{B}_{L}_{i}_{b}" for b in range(B)]
    seqs = [SequenceInput(s, rng.integers(0, meta.vocab_size, L, dtype=np.int64), 0) for s in ids]
    t0 = time.perf_counter(); ex.expand(seqs, Budget(top_k=8, max_depth=0, max_breadth=8)); dt = time.perf_counter() - t0
    ex.release(ids); return dt * 1e3
def setup_step(ex, B):
    ids = [f"s{B}_{b}" for b in range(B)]
    ex.expand([SequenceInput(s, rng.integers(0, meta.vocab_size, 255, dtype=np.int64), 0) for s in ids], Budget(8, 0, 8))
    return ids
def step(ex, ids):
    seqs = [SequenceInput(s, rng.integers(0, meta.vocab_size, 1, dtype=np.int64), 255) for s in ids]
    t0 = time.perf_counter(); ex.expand(seqs, tree); dt = time.perf_counter() - t0
    for s in ids: ex.rewind(s, 255)
    return dt * 1e3
cells = {}
steps = {name: {B: setup_step(ex, B) for B in (1, 8)} for name, ex in arms.items()}
order = ["sliced", "whole", "whole", "sliced"]
for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 6):
    for name in order:
        ex = arms[name]
        for B, L in ((1, 400), (8, 400), (1, 1500)):
            cells.setdefault((name, f"prefill B={B} L={L}"), []).append(prefill(ex, B, L, rep))
        for B in (1, 8):
            for _ in range(3):
                cells.setdefault((name, f"step B={B} ctx=256"), []).append(step(ex, steps[name][B]))
out = {}
for cell in sorted({c for _, c in cells}):
    a, b = np.median(cells[("sliced", cell)]), np.median(cells[("whole", cell)])
    out[cell] = {"sliced_ms": round(float(a), 2), "whole_ms": round(float(b), 2), "ratio": round(float(a / b), 3),
                 "n": len(cells[("sliced", cell)])}
    print(cell, out[cell], flush=True)
json.dump(out, open(sys.argv[2] if len(sys.argv) > 2 else "/tmp/i24m/ab_inproc.json", "w"), indent=1)
