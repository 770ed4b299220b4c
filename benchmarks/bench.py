"""`cast bench`: a bounded load generator over real gRPC against a running orchestrator.

For each policy and concurrency level it sends HumanEval prompts (or a file's) through `GenerateStream`, bounded in
requests and time, and reports throughput, time to first token, time per output token and mean accepted length.
Requests are greedy, so every policy must produce `ar`'s tokens for the same prompt: where `ar` ran too, each level
also counts the requests whose output differs from `ar`'s (`differ_from_ar`; on a GPU in bfloat16 a tree forward and
a one-token forward can round a near-tie apart, on the CPU in float32 it should be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cast.v1 import generation_pb2, generation_pb2_grpc
from orchestrator.auth import add_client_flags, bearer, public_channel


@dataclass(frozen=True)
class StepBreakdown:
    """One step's milliseconds: the services' own work, the two RPCs' overhead and the orchestrator's time; what
    the cost model predicted for the two calls; and the tree it verified."""

    step: float
    draft_model: float
    verify_model: float
    expand_rpc: float    # Expand wall - draft's work (0 in a step without a draft)
    verify_rpc: float    # Verify wall - verifier's work
    orchestrator: float  # step wall - both RPC walls: policy, trees, bookkeeping, streaming
    predicted_draft: float = 0.0   # the cost model's price of the Expand wall (0: not predicted)
    predicted_verify: float = 0.0  # ... of the Verify wall
    verified_nodes: int = 0
    depth: int = 0
    accepted_tokens: int = 0
    drafted: bool = False    # the step verified a drafted tree (more than its root)
    pipeline: str = "none"   # hit / miss / none (StepStats.pipeline)
    arm: str = "plain"       # StepStats.arm and .mode: the kind of step the policy ran
    mode: str = ""

    @property
    def rpc(self) -> float:
        return self.expand_rpc + self.verify_rpc

    @property
    def calls(self) -> float:
        """The Expand and Verify walls: what the cost model predicts (the step less the orchestrator's own time)."""
        return self.step - self.orchestrator

    @property
    def draft_wall(self) -> float:
        return self.draft_model + self.expand_rpc

    @property
    def verify_wall(self) -> float:
        return self.verify_model + self.verify_rpc

    @property
    def predicted(self) -> float:
        return self.predicted_draft + self.predicted_verify

    @staticmethod
    def from_proto(s) -> StepBreakdown:
        return StepBreakdown(
            step=1e3 * s.step_seconds,
            draft_model=1e3 * s.draft_model_seconds,
            verify_model=1e3 * s.verify_model_seconds,
            expand_rpc=1e3 * (s.draft_rpc_seconds - s.draft_model_seconds),
            verify_rpc=1e3 * (s.verify_rpc_seconds - s.verify_model_seconds),
            orchestrator=1e3 * (s.step_seconds - s.draft_rpc_seconds - s.verify_rpc_seconds),
            predicted_draft=s.predicted_draft_ms,
            predicted_verify=s.predicted_verify_ms,
            verified_nodes=s.verified_nodes,
            depth=s.depth,
            accepted_tokens=s.accepted_tokens,
            drafted=s.verified_nodes > 1,
            pipeline=s.pipeline or "none",
            arm=s.arm or "plain",
            mode=s.mode,
        )


@dataclass
class RequestResult:
    prompt: str
    token_ids: list[int]
    ttft_s: float
    total_s: float
    completion_tokens: int
    steps: int
    mean_accepted_length: float
    draft_s: float
    verify_s: float
    other_s: float
    verified_nodes: float  # mean nodes sent to the verifier per step
    expanded_nodes: float  # mean nodes the draft proposed per step (root included)
    verified_depth: float  # mean deepest verified layer per step
    step_breakdowns: list[StepBreakdown]
    cut: bool = False      # stopped by the level's cutoff: token_ids is a prefix of the output, no step stats

    @staticmethod
    def cut_short(prompt: str, token_ids: list[int], ttft_s: float, total_s: float) -> RequestResult:
        return RequestResult(prompt, token_ids, ttft_s, total_s, len(token_ids), 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                             0.0, [], cut=True)


@dataclass
class LevelResult:
    policy: str
    concurrency: int
    requests: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    latency_p50_s: float
    mean_accepted_length: float
    draft_ms_per_step: float     # the orchestrator's wall time in Expand calls (RPC included)
    verify_ms_per_step: float    # ... in Prefill and Verify calls
    other_ms_per_step: float     # the rest of the request's time: scheduling, policy, detokenising, queueing
    verified_nodes_per_step: float
    expanded_nodes_per_step: float
    verified_depth_per_step: float
    # Medians over all steps (a batched step counts once per sequence in it):
    step_ms_p50: float
    draft_model_ms_p50: float
    verify_model_ms_p50: float
    rpc_ms_p50: float            # gRPC overhead of the step's Expand and Verify
    expand_rpc_ms_p50: float     # ... of Expand alone
    verify_rpc_ms_p50: float     # ... of Verify alone
    orchestrator_ms_p50: float
    overhead_ms_p50: float       # rpc + orchestrator: what serving adds to the models' work
    # Medians over the steps, of the verified trees and of the cost model's prediction against the measured time:
    verified_nodes_p50: float = 0.0
    verified_depth_p50: float = 0.0
    accepted_tokens_p50: float = 0.0
    predicted_ms_p50: float = 0.0        # the cost model's price of the step's Expand + Verify (0: none predicted)
    measured_ms_p50: float = 0.0         # the step's Expand + Verify walls, as the orchestrator waited for them
    measured_over_predicted_p50: float = 0.0  # per step measured / predicted, over the steps with a prediction
    # ... per part, over the drafted steps: which of the two calls the cost model misprices
    draft_over_predicted_p50: float = 0.0   # Expand wall / its price
    verify_over_predicted_p50: float = 0.0  # Verify wall / its price
    differ_from_ar: int = -1     # requests whose tokens differ from `ar`'s for the same prompt (-1: no `ar` run)
    cut_requests: int = 0        # of `requests`, those cancelled at the level's cutoff (their tokens count)
    # Pipelined steps: of the steps with a prepared tree, those whose guess came true; and a drafted step's time
    # outside the verify service's forward (step - verify model), median.
    pipeline_hit_rate: float = float("nan")
    outside_verify_ms_p50: float = float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(round(q / 100 * (len(ordered) - 1))), len(ordered) - 1)]


def mean_of(items, attribute: str) -> float:
    return statistics.mean(getattr(i, attribute) for i in items) if items else 0.0


async def one_request(stub, prompt: str, policy: str, max_new_tokens: int, timeout_s: float,
                      progress: list | None = None, metadata: tuple = ()) -> RequestResult:
    """One streamed request. `progress`, when given, is filled as [start, first token time, token ids so far] while
    the stream runs, so that a caller that cancels the request still knows what it received."""
    request = generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens, policy=policy, return_step_stats=True)
    start = time.perf_counter()
    first = None
    last = None
    token_ids: list[int] = []
    if progress is not None:
        progress[:] = [start, None, token_ids]
    async for chunk in stub.GenerateStream(request, timeout=timeout_s, metadata=metadata):
        if first is None and chunk.token_ids:
            first = time.perf_counter()
            if progress is not None:
                progress[1] = first
        token_ids.extend(chunk.token_ids)
        last = chunk
    end = time.perf_counter()
    return RequestResult(
        prompt=prompt,
        token_ids=token_ids,
        ttft_s=(first or end) - start,
        total_s=end - start,
        completion_tokens=last.usage.completion_tokens,
        steps=last.stats.steps,
        mean_accepted_length=last.stats.mean_accepted_length,
        draft_s=last.stats.draft_seconds,
        verify_s=last.stats.verify_seconds,
        other_s=last.stats.other_seconds,
        verified_nodes=mean_of(last.stats.step_stats, "verified_nodes"),
        expanded_nodes=mean_of(last.stats.step_stats, "expanded_nodes"),
        verified_depth=mean_of(last.stats.step_stats, "depth"),
        step_breakdowns=[StepBreakdown.from_proto(s) for s in last.stats.step_stats],
    )


async def run_level(
    address: str, prompts: list[str], policy: str, concurrency: int, max_new_tokens: int, max_requests: int,
    max_seconds: float, cutoff_s: float | None = None, token: str | None = None, tls_ca: Path | None = None,
) -> tuple[LevelResult, list[RequestResult]]:
    """Up to `max_requests` requests, `concurrency` at a time; none starts after `max_seconds`. With `cutoff_s`,
    requests still streaming at that time are cancelled and count with the tokens they received (`cut`)."""
    results: list[RequestResult] = []
    queue = list(reversed(prompts[:max_requests]))
    in_flight: dict[int, tuple[str, list]] = {}  # worker -> (prompt, one_request's progress)
    async with public_channel(address, tls_ca, aio=True) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        start = time.perf_counter()
        deadline = start + max_seconds

        async def worker(w: int) -> None:
            while queue and time.perf_counter() < deadline:
                prompt, progress = queue.pop(), []
                in_flight[w] = (prompt, progress)
                results.append(await one_request(stub, prompt, policy, max_new_tokens, timeout_s=max(max_seconds, 60),
                                                 progress=progress, metadata=bearer(token)))
                del in_flight[w]

        try:
            await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(concurrency))), cutoff_s)
        except asyncio.TimeoutError:
            now = time.perf_counter()
            for prompt, (began, first, token_ids) in (v for v in in_flight.values() if v[1]):
                results.append(RequestResult.cut_short(prompt, token_ids, (first or now) - began, now - began))
            await asyncio.sleep(0.1)  # the cancelled calls' last events, before the channel and the loop close
        wall = time.perf_counter() - start
    finished = [r for r in results if not r.cut]
    tokens = sum(r.completion_tokens for r in results)
    # Per-step figures come from the requests that finished (a cut one has no step stats).
    finished_tokens = sum(r.completion_tokens for r in finished)
    tpots = [(r.total_s - r.ttft_s) / (r.completion_tokens - 1) for r in finished if r.completion_tokens > 1]
    steps = sum(r.steps for r in finished)
    steps_ms = [b for r in finished for b in r.step_breakdowns]
    return LevelResult(
        policy=policy,
        concurrency=concurrency,
        requests=len(results),
        completion_tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if wall else 0.0,
        cut_requests=len(results) - len(finished),
        ttft_p50_ms=percentile([r.ttft_s * 1e3 for r in results], 50),
        ttft_p99_ms=percentile([r.ttft_s * 1e3 for r in results], 99),
        tpot_p50_ms=percentile([t * 1e3 for t in tpots], 50),
        tpot_p99_ms=percentile([t * 1e3 for t in tpots], 99),
        latency_p50_s=statistics.median(r.total_s for r in results) if results else float("nan"),
        mean_accepted_length=finished_tokens / steps if steps else 0.0,
        draft_ms_per_step=1e3 * sum(r.draft_s for r in finished) / steps if steps else 0.0,
        verify_ms_per_step=1e3 * sum(r.verify_s for r in finished) / steps if steps else 0.0,
        other_ms_per_step=1e3 * sum(r.other_s for r in finished) / steps if steps else 0.0,
        verified_nodes_per_step=mean_of(finished, "verified_nodes"),
        expanded_nodes_per_step=mean_of(finished, "expanded_nodes"),
        verified_depth_per_step=mean_of(finished, "verified_depth"),
        step_ms_p50=percentile([b.step for b in steps_ms], 50),
        draft_model_ms_p50=percentile([b.draft_model for b in steps_ms], 50),
        verify_model_ms_p50=percentile([b.verify_model for b in steps_ms], 50),
        rpc_ms_p50=percentile([b.rpc for b in steps_ms], 50),
        expand_rpc_ms_p50=percentile([b.expand_rpc for b in steps_ms], 50),
        verify_rpc_ms_p50=percentile([b.verify_rpc for b in steps_ms], 50),
        orchestrator_ms_p50=percentile([b.orchestrator for b in steps_ms], 50),
        overhead_ms_p50=percentile([b.rpc + b.orchestrator for b in steps_ms], 50),
        verified_nodes_p50=percentile([b.verified_nodes for b in steps_ms], 50),
        verified_depth_p50=percentile([b.depth for b in steps_ms], 50),
        accepted_tokens_p50=percentile([b.accepted_tokens for b in steps_ms], 50),
        predicted_ms_p50=percentile([b.predicted for b in steps_ms], 50),
        measured_ms_p50=percentile([b.calls for b in steps_ms], 50),
        measured_over_predicted_p50=percentile([b.calls / b.predicted for b in steps_ms if b.predicted > 0], 50),
        draft_over_predicted_p50=percentile([b.draft_wall / b.predicted_draft for b in steps_ms
                                             if b.drafted and b.predicted_draft > 0], 50),
        verify_over_predicted_p50=percentile([b.verify_wall / b.predicted_verify for b in steps_ms
                                              if b.drafted and b.predicted_verify > 0], 50),
        pipeline_hit_rate=hit_rate(steps_ms),
        outside_verify_ms_p50=percentile([b.step - b.verify_model for b in steps_ms if b.drafted], 50),
    ), results


def hit_rate(steps: list[StepBreakdown]) -> float:
    hits, misses = (sum(b.pipeline == outcome for b in steps) for outcome in ("hit", "miss"))
    return hits / (hits + misses) if hits + misses else float("nan")


def count_differences(rows: list[tuple[LevelResult, list[RequestResult]]]) -> None:
    """Set each level's differ_from_ar: its requests whose tokens differ from the first `ar` output for that prompt."""
    reference: dict[str, list[int]] = {}
    for level, results in rows:
        if level.policy == "ar":
            for r in results:
                reference.setdefault(r.prompt, r.token_ids)
    if not reference:
        return
    for level, results in rows:
        level.differ_from_ar = sum(r.token_ids != reference[r.prompt] for r in results if r.prompt in reference)


def write_csv(rows: list[LevelResult], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def plot(rows: list[LevelResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for policy in dict.fromkeys(r.policy for r in rows):
        mine = [r for r in rows if r.policy == policy]
        xs = [r.concurrency for r in mine]
        axes[0].plot(xs, [r.tokens_per_s for r in mine], marker="o", label=policy)
        axes[1].plot(xs, [r.tpot_p50_ms for r in mine], marker="o", label=policy)
        axes[2].plot(xs, [r.mean_accepted_length for r in mine], marker="o", label=policy)
    for ax, label in zip(axes, ("throughput (tokens/s)", "time per output token p50 (ms)", "tokens per step")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def load_prompts(source: str) -> list[str]:
    if source == "humaneval":
        from cast_models.humaneval import load_prompts as humaneval

        return humaneval()
    return [json.loads(line)["prompt"] for line in Path(source).read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cast bench", description=__doc__)
    p.add_argument("--addr", default="127.0.0.1:50051")
    p.add_argument("--policies", default="cast,eagle2,chain,ar")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--prompts", default="humaneval", help="'humaneval' or a JSONL file with a 'prompt' field")
    p.add_argument("--rstrip-prompts", action="store_true",
                   help="strip trailing whitespace from prompts (the reference pair's card explains why)")
    p.add_argument("--requests", type=int, default=32, help="requests per level at most")
    p.add_argument("--seconds", type=float, default=120.0, help="time per level at most")
    p.add_argument("--warmup", type=int, default=0,
                   help="before each level, this many untimed requests per concurrent client (first-use costs such as "
                        "CUDA graph captures stay out of the numbers)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--title", default="cast bench")
    add_client_flags(p)
    a = p.parse_args(argv)
    prompts = load_prompts(a.prompts)
    if a.rstrip_prompts:
        prompts = [q.rstrip() for q in prompts]
    levels = []
    for policy in a.policies.split(","):
        for concurrency in (int(c) for c in a.concurrency.split(",")):
            if a.warmup > 0:
                asyncio.run(run_level(a.addr, prompts, policy, concurrency, a.max_new_tokens, a.warmup * concurrency,
                                      a.seconds, token=a.token, tls_ca=a.tls_ca))
            row, results = asyncio.run(run_level(a.addr, prompts, policy, concurrency, a.max_new_tokens, a.requests,
                                                 a.seconds, token=a.token, tls_ca=a.tls_ca))
            print(
                f"{policy:>7} c={concurrency:<3} {row.tokens_per_s:8.1f} tok/s  ttft p50 {row.ttft_p50_ms:7.1f} ms  "
                f"tpot p50 {row.tpot_p50_ms:6.2f} ms  {row.mean_accepted_length:.2f} tok/step  "
                f"step: draft {row.draft_ms_per_step:.1f} verify {row.verify_ms_per_step:.1f} "
                f"other {row.other_ms_per_step:.1f} ms, {row.verified_nodes_per_step:.1f} of {row.expanded_nodes_per_step:.1f} "
                f"nodes verified, depth {row.verified_depth_per_step:.1f}  ({row.requests} req)\n"
                f"{'':>13}step p50 {row.step_ms_p50:.2f} ms = draft model {row.draft_model_ms_p50:.2f} + verify model "
                f"{row.verify_model_ms_p50:.2f} + rpc {row.rpc_ms_p50:.2f} + orchestrator {row.orchestrator_ms_p50:.2f} "
                f"(overhead p50 {row.overhead_ms_p50:.2f} ms; rpc p50 Expand {row.expand_rpc_ms_p50:.2f}, "
                f"Verify {row.verify_rpc_ms_p50:.2f})\n"
                f"{'':>13}pipeline hits {row.pipeline_hit_rate:.2f}, drafted step outside the verify forward p50 "
                f"{row.outside_verify_ms_p50:.2f} ms",
                file=sys.stderr,
                flush=True,
            )
            levels.append((row, results))
    count_differences(levels)
    rows = [row for row, _ in levels]
    if any(row.differ_from_ar >= 0 for row in rows):
        print("outputs that differ from ar's: " + ", ".join(f"{r.policy} c={r.concurrency} {r.differ_from_ar}/{r.requests}"
                                                           for r in rows), file=sys.stderr)
    a.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, a.out / "bench.csv")
    try:
        plot(rows, a.out / "bench.png", a.title)
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print(a.out / "bench.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
