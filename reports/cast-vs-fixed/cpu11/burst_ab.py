"""A/B of bursts: waves of requests that arrive at once at an idle stack, `ar` then `cast`, on two stacks in turn.

    python reports/cast-vs-fixed/cpu11/burst_ab.py BASE_ADDR NEW_ADDR [--rounds 4] [--requests 32] [--tokens 48]

Per wave: its wall time (all requests sent at once, to the last token), each request's time to first token, and
how many of `cast`'s requests drafted in their first step. Each stack's `cast` / `ar` is taken within a round
(ar's wave just before cast's), so the machine's drift hits both alike; stacks alternate base, new, new, base, ...
"""
import argparse
import asyncio
import statistics
import time

import grpc

from benchmarks.bench import load_prompts
from cast.v1 import generation_pb2, generation_pb2_grpc


async def one(stub, prompt: str, policy: str, tokens: int, sent: float):
    request = generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=tokens, policy=policy, ignore_eos=True,
                                             return_step_stats=True)
    first, last = None, None
    async for chunk in stub.GenerateStream(request):
        first = first or time.perf_counter() - sent
        last = chunk
    steps = list(last.stats.step_stats)
    return first, steps[0].arm != "plain", sum(s.accepted_tokens for s in steps)


async def wave(addr: str, prompts: list[str], policy: str, tokens: int):
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        await stub.Generate(generation_pb2.GenerateRequest(prompt="x", max_new_tokens=1, policy="ar"))  # channel up
        await asyncio.sleep(0.5)  # idle
        sent = time.perf_counter()
        runs = await asyncio.gather(*(one(stub, p, policy, tokens, sent) for p in prompts))
        wall = time.perf_counter() - sent
    return dict(tok_s=sum(r[2] for r in runs) / wall, ttft_ms=1e3 * statistics.median(r[0] for r in runs),
                first_drafted=sum(r[1] for r in runs))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--prompts", default="benchmarks/prompts/heldout.jsonl")
    a = p.parse_args()
    prompts = [q.rstrip() for q in load_prompts(a.prompts)][: a.requests]
    addrs = {"base": a.base, "new": a.new}
    for who in addrs:  # warm-up: each policy's gate judges this batch size
        for policy in ("ar", "cast", "cast"):
            asyncio.run(wave(addrs[who], prompts, policy, 16))
    ratios = {"base": [], "new": []}
    print("round,stack,policy,tok_s,ttft_ms,first_step_drafted")
    for r in range(a.rounds):
        for who in (("base", "new") if r % 2 == 0 else ("new", "base")):
            got = {policy: asyncio.run(wave(addrs[who], prompts, policy, a.tokens)) for policy in ("ar", "cast")}
            for policy, g in got.items():
                print(f"{r},{who},{policy},{g['tok_s']:.1f},{g['ttft_ms']:.0f},{g['first_drafted']}", flush=True)
            ratios[who].append((got["cast"]["tok_s"] / got["ar"]["tok_s"], got["cast"]["ttft_ms"] / got["ar"]["ttft_ms"]))
    for who, rs in ratios.items():
        print(f"{who}: cast / ar tokens/s per round {' '.join(f'{x:.2f}' for x, _ in rs)} (median "
              f"{statistics.median(x for x, _ in rs):.2f}); TTFT cast / ar {' '.join(f'{y:.2f}' for _, y in rs)} "
              f"(median {statistics.median(y for _, y in rs):.2f})")


if __name__ == "__main__":
    main()
