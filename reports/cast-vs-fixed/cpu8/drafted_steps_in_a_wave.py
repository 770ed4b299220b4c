"""Where `cast`'s drafted steps fall in a wave of 32 requests at concurrency 32 (after a warm-up wave)."""
import asyncio, collections, sys
import grpc
from cast.v1 import generation_pb2, generation_pb2_grpc
from benchmarks.bench import load_prompts

async def one(stub, prompt, tokens):
    req = generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=tokens, policy="cast", return_step_stats=True)
    last = None
    async for chunk in stub.GenerateStream(req):
        last = chunk
    return list(last.stats.step_stats)

async def main(addr):
    prompts = [p.rstrip() for p in load_prompts("humaneval")][:32]
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        await asyncio.gather(*(one(stub, p, 16) for p in prompts))  # warm-up wave
        for wave in range(2):
            runs = await asyncio.gather(*(one(stub, p, 48) for p in prompts))
            by_index = collections.Counter()
            drafted = collections.Counter()
            ms = collections.Counter()
            for steps in runs:
                for i, s in enumerate(steps):
                    b = min(i // 5, 9)
                    by_index[b] += 1
                    if s.arm != "plain":
                        drafted[b] += 1
                        ms[b] += s.step_seconds * 1e3
            print(f"wave {wave}: steps per request {sum(len(r) for r in runs)/len(runs):.1f}")
            for b in sorted(by_index):
                print(f"  step index {5*b:2d}-{5*b+4:2d}: {by_index[b]:4d} steps, drafted {drafted[b]:4d}, "
                      f"drafted step ms mean {ms[b]/max(drafted[b],1):.1f}")
            all_ms = [s.step_seconds*1e3 for r in runs for s in r]
            print(f"  step ms mean {sum(all_ms)/len(all_ms):.1f}")

asyncio.run(main(sys.argv[1]))
