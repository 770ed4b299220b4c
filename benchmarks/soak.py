"""`cast soak`: a bounded soak test with faults, on loopback.

Starts a stack (2 draft and 2 verify replicas by default, float64 verifiers so that outputs are exact), then for
`--minutes` (and at most `--max-requests`) sends mixed greedy and seeded sampled requests at several concurrencies,
some cancelled on purpose and some with a deadline too short on purpose, while every `--kill-every` seconds a draft
or a verify replica (taking turns; `draft-2`, `verify-2`, ...: the first replica of each stays) is SIGKILLed and
started again. Afterwards a sample of the completed requests is run again alone, without faults: its outputs must
be the same token for token. Each service's resident memory is sampled every few seconds.

Writes OUT/summary.json, OUT/requests.csv (one row per request), OUT/memory.csv and OUT/memory.png.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from cast.v1 import draft_pb2, draft_pb2_grpc, generation_pb2, generation_pb2_grpc, verify_pb2, verify_pb2_grpc

CONCURRENCY_LEVELS = (1, 4, 8)  # one per minute, in turn


@dataclass
class Outcome:
    started_s: float
    seconds: float
    kind: str                # greedy or seeded
    how: str                 # plain, cancel (cancelled on purpose), deadline (a short deadline on purpose)
    status: str              # OK or a status code's name
    prompt: int              # index into the prompts
    max_new_tokens: int
    seed: int
    tokens: int
    replays: int
    token_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def failed(self) -> bool:
        """Not OK, and not the cancel or deadline the soak asked for."""
        on_purpose = {"cancel": "CANCELLED", "deadline": "DEADLINE_EXCEEDED"}.get(self.how)
        return self.status not in ("OK", on_purpose)


def request_for(o: Outcome, prompts: list[str]) -> generation_pb2.GenerateRequest:
    sampled = o.kind == "seeded"
    return generation_pb2.GenerateRequest(prompt=prompts[o.prompt], max_new_tokens=o.max_new_tokens, ignore_eos=True,
                                          temperature=0.8 if sampled else 0.0, top_p=0.95 if sampled else 1.0,
                                          seed=o.seed if sampled else None)


async def one(stub, o: Outcome, prompts: list[str], rng: random.Random) -> Outcome:
    start = time.monotonic()
    timeout = rng.uniform(0.2, 1.5) if o.how == "deadline" else 300
    call = stub.GenerateStream(request_for(o, prompts), timeout=timeout)
    cancel_after = rng.uniform(0.1, 2.0) if o.how == "cancel" else None
    try:
        async def read() -> None:
            async for chunk in call:
                o.token_ids.extend(chunk.token_ids)
                if chunk.HasField("stats"):
                    o.replays = chunk.stats.replays
        if cancel_after is None:
            await read()
        else:
            try:
                await asyncio.wait_for(read(), cancel_after)
            except TimeoutError:
                call.cancel()
                o.status = "CANCELLED"
        o.status = o.status or "OK"
    except grpc.aio.AioRpcError as e:
        o.status = e.code().name
    except asyncio.CancelledError:
        o.status = "CANCELLED"
    o.seconds = time.monotonic() - start
    o.tokens = len(o.token_ids)
    return o


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def live_sessions(addresses: dict[str, str]) -> dict[str, int]:
    """Sessions each draft and verify replica holds now."""
    out = {}
    for name, address in addresses.items():
        async with grpc.aio.insecure_channel(address) as channel:
            if name.startswith("draft"):
                reply = await draft_pb2_grpc.DraftServiceStub(channel).Describe(draft_pb2.DraftDescribeRequest(), timeout=10)
            else:
                reply = await verify_pb2_grpc.VerifyServiceStub(channel).Describe(verify_pb2.VerifyDescribeRequest(),
                                                                                 timeout=10)
            out[name] = reply.replica.live_sequences
    return out


async def soak(stack, a, prompts: list[str]) -> dict:
    rng = random.Random(a.seed)
    outcomes: list[Outcome] = []
    memory: list[tuple[float, str, float]] = []
    events: list[tuple[float, str]] = []
    t0 = time.monotonic()
    end = t0 + a.minutes * 60
    level = CONCURRENCY_LEVELS[0]

    def now() -> float:
        return time.monotonic() - t0

    async def worker(i: int, stub) -> None:
        while time.monotonic() < end and len(outcomes) < a.max_requests:
            if i >= level:
                await asyncio.sleep(0.2)
                continue
            roll = rng.random()
            o = Outcome(started_s=now(), seconds=0.0, kind=rng.choice(["greedy", "seeded"]),
                        how="cancel" if roll < 0.1 else "deadline" if roll < 0.2 else "plain", status="",
                        prompt=rng.randrange(len(prompts)), max_new_tokens=rng.randint(8, 48),
                        seed=rng.randrange(2**32), tokens=0, replays=0)
            outcomes.append(await one(stub, o, prompts, rng))

    async def chaos() -> None:
        victims = [n for n in stack.processes if n.startswith(("draft-", "verify-"))]
        turn = 0
        while victims:
            await asyncio.sleep(a.kill_every)
            if time.monotonic() >= end:
                return
            name = victims[turn % len(victims)]
            turn += 1
            stack.processes[name].send_signal(signal.SIGKILL)
            await asyncio.to_thread(stack.processes[name].wait)
            events.append((now(), f"SIGKILL {name}"))
            stack.launch(name)
            events.append((now(), f"restart {name}"))

    async def sample_memory() -> None:
        while time.monotonic() < end:
            for name, proc in stack.processes.items():
                mb = rss_mb(proc.pid)
                if mb is not None:
                    memory.append((now(), name, mb))
            await asyncio.sleep(a.memory_every)

    async def levels() -> None:
        nonlocal level
        k = 0
        while time.monotonic() < end:
            level = CONCURRENCY_LEVELS[k % len(CONCURRENCY_LEVELS)]
            events.append((now(), f"concurrency {level}"))
            k += 1
            await asyncio.sleep(60)

    async with grpc.aio.insecure_channel(stack.spec.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        background = [asyncio.create_task(c) for c in (chaos(), sample_memory(), levels())]
        await asyncio.gather(*(worker(i, stub) for i in range(max(CONCURRENCY_LEVELS))))
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        load_s = now()
        # Outputs checked: a sample of the completed requests, each run again alone, without faults.
        done = [o for o in outcomes if o.status == "OK" and o.how == "plain"]
        sample = rng.sample(done, min(a.check, len(done)))
        wrong = []
        for o in sample:
            solo = Outcome(0, 0, o.kind, "plain", "", o.prompt, o.max_new_tokens, o.seed, 0, 0)
            await one(stub, solo, prompts, rng)
            if solo.token_ids != o.token_ids:
                wrong.append({"prompt": o.prompt, "kind": o.kind, "seed": o.seed, "soak": o.token_ids,
                              "solo": solo.token_ids, "solo_status": solo.status})
        replicas = await stub.ListReplicas(generation_pb2.ListReplicasRequest(), timeout=10)
    await asyncio.sleep(2)  # releases of the last requests are on their way
    leftover = await live_sessions({n: ad for n, ad in stack.addresses().items() if n != "orchestrator"})
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = f"{o.how}:{o.status}"
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "minutes": a.minutes, "load_seconds": round(load_s, 1), "requests": len(outcomes),
        "completed": sum(o.status == "OK" for o in outcomes), "failed": sum(o.failed for o in outcomes),
        "by_status": statuses, "tokens": sum(o.tokens for o in outcomes if o.status == "OK"),
        "replayed_requests": sum(o.replays > 0 for o in outcomes), "replays_seen_by_orchestrator": replicas.replays,
        "checked_against_solo": len(sample), "wrong_outputs": len(wrong), "wrong": wrong[:5],
        "sessions_left": leftover, "events": events, "memory": memory,
        "outcomes": [asdict(o) | {"token_ids": None} for o in outcomes],
    }


def memory_growth(memory: list[tuple[float, str, float]], since_s: float, restarted: set[str]) -> dict[str, float]:
    """Per process that ran the whole soak (not `restarted`): RSS at the end over RSS at `since_s` (its first sample
    from then), minus 1."""
    growth = {}
    for name in sorted({n for _, n, _ in memory} - restarted):
        points = [(t, mb) for t, n, mb in memory if n == name and t >= since_s]
        if len(points) >= 2:
            growth[name] = points[-1][1] / points[0][1] - 1
    return growth


def plot(memory, events, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in sorted({n for _, n, _ in memory}):
        points = [(t / 60, mb) for t, n, mb in memory if n == name]
        ax.plot(*zip(*points), label=name, lw=1.2)
    for t, what in events:
        if what.startswith("SIGKILL"):
            ax.axvline(t / 60, color="red", lw=0.6, alpha=0.5)
    ax.set_xlabel("minutes (red: a replica SIGKILLed and restarted)")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("cast soak: resident memory per service")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench import load_prompts
    from orchestrator.stack import Stack, StackSpec, default_pair, free_ports

    p = argparse.ArgumentParser(prog="cast soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="load time (then the solo checks)")
    p.add_argument("--max-requests", type=int, default=5000, help="requests at most")
    p.add_argument("--kill-every", type=float, default=60.0, help="seconds between replica kills")
    p.add_argument("--draft-replicas", type=int, default=2)
    p.add_argument("--verify-replicas", type=int, default=2)
    p.add_argument("--check", type=int, default=40, help="completed requests run again alone and compared")
    p.add_argument("--memory-every", type=float, default=5.0, help="seconds between memory samples")
    p.add_argument("--target", type=Path, help="target checkpoint (default: the reference pair)")
    p.add_argument("--draft", type=Path, help="draft checkpoint (default: the reference pair)")
    p.add_argument("--prompts", default="humaneval", help="'humaneval' or a JSONL file with a 'prompt' field")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("soak-out"))
    a = p.parse_args(argv)
    if a.minutes <= 0 or a.max_requests < 1:
        p.error("--minutes and --max-requests must be positive")
    target, draft = (a.target, a.draft) if a.target and a.draft else default_pair()
    a.out.mkdir(parents=True, exist_ok=True)
    n = 2 * (a.draft_replicas + a.verify_replicas) + 2
    ports = free_ports(n)
    # Replica i listens on base + 2 i: pick bases whose ranges are free (checked again by the bind at start-up).
    spec = StackSpec(target, draft, port=ports[0], draft_port=ports[1], verify_port=ports[1] + 1,
                     verify_dtype="float64", log_dir=a.out / "logs", draft_replicas=a.draft_replicas,
                     verify_replicas=a.verify_replicas)
    stack = Stack(spec).start()
    try:
        stack.wait_ready(900)
        print(f"soak: {a.minutes} min on {spec.address}", file=sys.stderr, flush=True)
        prompts = [q.rstrip() for q in load_prompts(a.prompts)]  # rstrip: the reference pair's card says why
        result = asyncio.run(soak(stack, a, prompts))
    finally:
        stack.stop()
    memory, events, outcomes = result.pop("memory"), result["events"], result.pop("outcomes")
    restarted = {what.split()[-1] for _, what in events if what.startswith("restart")}
    result["memory_growth_from_minute_2"] = {k: round(v, 4) for k, v in memory_growth(memory, 120.0, restarted).items()}
    with open(a.out / "memory.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seconds", "process", "rss_mib"])
        w.writerows((round(t, 1), name, round(mb, 1)) for t, name, mb in memory)
    with open(a.out / "requests.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in outcomes[0] if k != "token_ids"] if outcomes else ["none"])
        w.writeheader()
        w.writerows({k: v for k, v in o.items() if k != "token_ids"} for o in outcomes)
    (a.out / "summary.json").write_text(json.dumps(result, indent=1))
    try:
        plot(memory, events, a.out / "memory.png")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print(json.dumps({k: v for k, v in result.items() if k not in ("events", "wrong")}, indent=1))
    ok = (result["failed"] == 0 and result["wrong_outputs"] == 0 and not any(result["sessions_left"].values()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
