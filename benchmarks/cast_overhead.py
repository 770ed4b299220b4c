"""CAST's non-model work per step, in process: the draft service's Expand outside its ORT runs, and the
orchestrator's work on the trees it returns (no gRPC transport, no verifier).

    python -m benchmarks.cast_overhead --model models/reference/draft --batch 1,8 --repeats 40 --out o.json

Per batch cell, B HumanEval prompts are committed on the reference draft (CPU); each timed call commits one more
token of each prompt's text and grows a CAST tree with a budget priced by the orchestrator's own Planner from
GPU-shaped cost tables (a flat 7.3 ms verifier, 0.6 ms draft forwards: the H100 sweep of issue 21), so the trees
have its shape: depth 7-8, ~350 candidates, 48 returned. Then the sessions are rewound, so every call sees the same
context. Timed per call:

- draft: Expander.expand's wall time and its ORT runs; the same call again with the runner replaying the outputs
  of the first (`replay`: the Expand's own work alone, without the model, no ORT noise; the replay checks that it
  forwards the same rows); then building and serialising the ExpandResponse as the servicer does;
- orchestrator: parsing that response, Planner.select (calibrated values, C3, the cut), building and serialising the
  VerifyRequest, and the learning a step does (gain buffer, calibration, the draft gate, the cost model's correction,
  the next step's budget), on a copy of the planner, so that every call starts from the same state.

Replays and the orchestrator's work are also timed in thread CPU time (`cpu`): on a shared machine, wall time also
counts the time other processes took the CPU. It prints medians and writes a digest of the returned and the selected trees: two code versions that print the same
digest returned and verified the same trees. `--profile F` writes a cProfile of the non-model work (the replayed
Expand, the proto, the orchestrator; pstats).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import hashlib
import json
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from cast.v1 import draft_pb2, verify_pb2
from cast_core.cost_table import CostTable
from cast_runtime.sessions import SessionStore
from cast_runtime.wire import tree_to_proto
from draft_service.expansion import Expander, SequenceInput
from draft_service.export import export_draft
from draft_service.runner import DraftRunner
from draft_service.servicer import budget_from_proto, expansion_to_proto
from orchestrator.clients import expanded_from_proto

try:
    from orchestrator.clients import expansions_from_proto
except ImportError:  # an older tree, for A/B runs
    expansions_from_proto = None
from orchestrator.costs import CostModel
from orchestrator.planner import Planner
from orchestrator.policies import POLICIES

# GPU-shaped tables (ms): the H100 sweep's verify step (~7.3 ms, flat in tokens) and draft forward (~0.6 ms).
VERIFY_MS = (0.01, 7.3)
DRAFT_MS = (0.002, 0.6)
# Accepted tokens per unit of value by depth, as a trained pair's calibration measures them (rising with depth).
DEPTH_SCALES = (1.2, 1.5, 1.8, 2.1, 2.4, 2.7, 3.0, 3.3)


class ReplayRunner:
    """A DraftRunner whose runs answer what the last recorded runs answered, in order (the rest is the runner's)."""

    def __init__(self, runner: DraftRunner) -> None:
        self.inner = runner
        self.recorded: list[tuple[np.ndarray, np.ndarray]] = []
        self.replaying = False
        self.seen: list[np.ndarray] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, rows: np.ndarray) -> np.ndarray:
        if self.replaying:
            self.seen.append(rows)
            return self.recorded[len(self.seen) - 1][1]
        topk = self.inner.run(rows)
        self.recorded.append((rows.copy(), topk.copy()))
        return topk

    def record(self) -> None:
        self.recorded, self.replaying = [], False

    def replay(self) -> None:
        self.seen, self.replaying = [], True

    def check(self) -> None:
        if len(self.seen) != len(self.recorded) or not all(
                np.array_equal(a, b) for a, (b, _) in zip(self.seen, self.recorded)):
            raise AssertionError("the replayed Expand forwarded other rows than the recorded one")


def gpu_shaped_costs() -> CostModel:
    grid = dict(batch_sizes=(1, 2, 4, 8, 16, 32), context_buckets=(128, 512, 2048),
                token_counts=(1, 2, 4, 8, 16, 32, 64, 128))
    verify = CostTable.linear(*VERIFY_MS, device="NVIDIA H100 80GB HBM3", model_id="8b-shaped", **grid)
    draft = CostTable.linear(*DRAFT_MS, device="NVIDIA H100 80GB HBM3", model_id="reference-draft", **grid)
    return CostModel.from_tables(verify, draft)


def warm_planner(batch: int, verified: int) -> Planner:
    """CAST's planner as after some steps at this batch size: `verified` nodes and depth 6 verified lately, the
    calibration at DEPTH_SCALES."""
    planner = Planner(POLICIES["cast"])
    planner.verified_counts[batch] = deque([verified], maxlen=8)
    planner.verified_depths[batch] = deque([6], maxlen=8)
    planner.calibration.value = [100.0] * len(DEPTH_SCALES)
    planner.calibration.accepted = [100.0 * s for s in DEPTH_SCALES]
    return planner


def digest(trees) -> str:
    h = hashlib.sha256()
    for t in trees:
        for a in (t.tokens, t.parents, t.depths, t.values):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def prompt_ids(model: Path, count: int, length: int) -> list[np.ndarray]:
    """`count` HumanEval prompts' token ids, each cut or repeated to `length` + 1 tokens."""
    from tokenizers import Tokenizer

    from cast_models.humaneval import load_prompts

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    out = []
    for text in load_prompts()[:count]:
        ids = tokenizer.encode(text).ids
        ids = (ids * (1 + (length + 1) // max(len(ids), 1)))[: length + 1]
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def orchestrator_step(planner: Planner, costs: CostModel, data: bytes, batch: int, context: int, draft_ms: float):
    """What the orchestrator does with one Expand's answer in a step, bar the RPCs (step_loop.py's order)."""
    response = draft_pb2.ExpandResponse.FromString(data)
    if expansions_from_proto is not None:
        expanded = expansions_from_proto(response.trees)
    else:  # before issue 21's batch checks
        expanded = [expanded_from_proto(r) for r in response.trees]
    chosen = planner.select([e.tree for e in expanded], costs, batch, context, draft_ms)
    request = verify_pb2.VerifyRequest(sequences=[
        verify_pb2.VerifySequence(sequence_id=f"s{b}", tree=tree_to_proto(t), sampling=verify_pb2.SamplingParams())
        for b, t in enumerate(chosen)])
    request.SerializeToString()
    forwards = expanded[0].forwards(1)
    costs.observe_draft(batch, context, forwards, draft_ms / 1e3 + 5e-4, draft_ms / 1e3)
    planner.learn_layers([e.layer_utilities for e in expanded])
    committed = [1 + min(t.max_depth, 5) for t in chosen]  # an accepted path of up to 5 drafted tokens
    planner.learn_step(batch, True, chosen, committed, 15.0, False)
    planner.prepare_budget(costs, batch, context + 1)
    return expanded, chosen


def run_cell(runner: ReplayRunner, model: Path, batch: int, context: int, repeats: int, warmup: int, verified: int,
             profiler: cProfile.Profile | None) -> dict:
    expander = Expander(runner, SessionStore(batch, ttl_s=1e9), runner.meta.max_context)
    texts = prompt_ids(model, batch, context)
    ids = [f"s{b}" for b in range(batch)]
    start = context - 1
    runner.record()
    expander.expand([SequenceInput(s, t[:start], 0) for s, t in zip(ids, texts)],
                    budget_from_proto(draft_pb2.ExpandBudget(top_k=8, max_depth=0, max_breadth=8)))
    step = [SequenceInput(s, t[start:start + 1], start) for s, t in zip(ids, texts)]
    costs = gpu_shaped_costs()
    planner = warm_planner(batch, verified)
    budget_proto = planner.price_budget(costs, batch, context)
    rows = {"draft_wall": [], "draft_model": [], "draft_replay": [], "draft_replay_cpu": [], "draft_proto": [],
            "orch": [], "orch_cpu": []}
    for i in range(warmup + repeats):
        budget = budget_from_proto(budget_proto)  # the servicer parses the budget per call too
        on = profiler is not None and i >= warmup
        runner.record()
        t0 = time.perf_counter()
        trees, model_seconds = expander.expand(step, budget)
        t1 = time.perf_counter()
        if on:
            profiler.enable()
        data = draft_pb2.ExpandResponse(trees=[expansion_to_proto(e) for e in trees], draft_seconds=0.01,
                                        cold=False).SerializeToString()
        if on:
            profiler.disable()
        t2 = time.perf_counter()
        for s in ids:
            expander.rewind(s, start)
        runner.replay()
        c0, r0 = time.thread_time(), time.perf_counter()
        if on:
            profiler.enable()
        again, _ = expander.expand(step, budget)
        r1, c1 = time.perf_counter(), time.thread_time()
        if on:
            profiler.disable()
        runner.check()
        assert digest([x.tree for x in again]) == digest([x.tree for x in trees])
        for s in ids:
            expander.rewind(s, start)
        p, c = copy.deepcopy(planner), copy.deepcopy(costs)
        c3, t3 = time.thread_time(), time.perf_counter()
        if on:
            profiler.enable()
        expanded, chosen = orchestrator_step(p, c, data, batch, context, (t2 - t0) * 1e3)
        t4, c4 = time.perf_counter(), time.thread_time()
        if on:
            profiler.disable()
        if i >= warmup:
            rows["draft_wall"].append((t1 - t0) * 1e3)
            rows["draft_model"].append(model_seconds * 1e3)
            rows["draft_replay"].append((r1 - r0) * 1e3)
            rows["draft_replay_cpu"].append((c1 - c0) * 1e3)
            rows["orch_cpu"].append((c4 - c3) * 1e3)
            rows["draft_proto"].append((t2 - t1) * 1e3)
            rows["orch"].append((t4 - t3) * 1e3)
    nonmodel = np.array(rows["draft_wall"]) - np.array(rows["draft_model"])
    e = trees[0]
    return {
        "batch": batch,
        "candidates": e.expanded_nodes,
        "forwarded": sum(s.kept for s in e.layers),
        "layers": len(e.layers),
        "returned": len(e.tree),
        "verified": len(chosen[0]),
        "draft_wall_ms": float(np.median(rows["draft_wall"])),
        "draft_model_ms": float(np.median(rows["draft_model"])),
        "draft_nonmodel_ms": float(np.median(nonmodel)),
        "draft_replay_ms": float(np.median(rows["draft_replay"])),
        "draft_replay_cpu_ms": float(np.median(rows["draft_replay_cpu"])),
        "draft_proto_ms": float(np.median(rows["draft_proto"])),
        "orch_ms": float(np.median(rows["orch"])),
        "orch_cpu_ms": float(np.median(rows["orch_cpu"])),
        "returned_digest": digest([x.tree for x in trees]),
        "verified_digest": digest(chosen),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cast_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path, help="draft checkpoint directory (transformers format)")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--context", type=int, default=160, help="committed tokens before the tree's root, root included")
    p.add_argument("--verified", type=int, default=32, help="nodes verified lately (returned: 1.5x + 2, at most 48)")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    p.add_argument("--profile", type=Path, default=None, help="write a cProfile of the non-model work here")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    onnx_path, meta = export_draft(a.model, top_k=8, dtype="float32")
    runner = ReplayRunner(DraftRunner(onnx_path, meta, provider="cpu", threads=a.threads))
    profiler = cProfile.Profile() if a.profile else None
    rows = []
    print(f"{'batch':>5} {'cands':>6} {'fwd':>4} {'lay':>4} {'ret':>4} {'ver':>4} {'draft ms':>9} {'model':>7} "
          f"{'non-model':>9} {'replay':>7} {'cpu':>6} {'proto':>6} {'orch':>6} {'cpu':>6}  digests")
    for batch in [int(x) for x in a.batch.split(",")]:
        r = run_cell(runner, a.model, batch, a.context, a.repeats, a.warmup, a.verified, profiler)
        rows.append(r)
        print(f"{r['batch']:>5} {r['candidates']:>6} {r['forwarded']:>4} {r['layers']:>4} {r['returned']:>4} "
              f"{r['verified']:>4} {r['draft_wall_ms']:>9.3f} {r['draft_model_ms']:>7.3f} "
              f"{r['draft_nonmodel_ms']:>9.3f} {r['draft_replay_ms']:>7.3f} {r['draft_replay_cpu_ms']:>6.3f} "
              f"{r['draft_proto_ms']:>6.3f} {r['orch_ms']:>6.3f} {r['orch_cpu_ms']:>6.3f}  "
              f"{r['returned_digest']} {r['verified_digest']}")
        sys.stdout.flush()
    if profiler is not None:
        profiler.dump_stats(str(a.profile))
    if a.out:
        a.out.write_text(json.dumps({"context": a.context, "repeats": a.repeats, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
