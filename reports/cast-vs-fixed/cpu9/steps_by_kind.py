"""At concurrency C with N requests of `cast` (the sweep's cell): the unique steps, by kind, and their time."""
import asyncio, collections, statistics, sys, time
import grpc
from cast.v1 import generation_pb2, generation_pb2_grpc
from benchmarks.bench import load_prompts

async def one(stub, prompt, tokens, policy):
    req = generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=tokens, policy=policy, return_step_stats=True)
    last = None
    async for chunk in stub.GenerateStream(req):
        last = chunk
    return list(last.stats.step_stats)

async def cell(stub, prompts, c, tokens, policy):
    queue = list(prompts)
    runs = []
    async def worker():
        while queue:
            runs.append(await one(stub, queue.pop(0), tokens, policy))
    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(c)))
    return runs, time.perf_counter() - t

async def main(addr, c, n, policy, offset):
    prompts = [p.rstrip() for p in load_prompts(sys.argv[5] if len(sys.argv) > 5 else "humaneval")][offset:offset + n]
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        await cell(stub, prompts[:c], c, 16, policy)  # warm-up
        for r in range(2):
            runs, wall = await cell(stub, prompts, c, 48, policy)
            steps, first, tokens_in = {}, set(), collections.Counter()
            for run in runs:
                for i, s in enumerate(run):
                    key = (s.step_seconds, s.draft_rpc_seconds, s.verify_rpc_seconds)
                    steps[key] = s
                    tokens_in[key] += s.accepted_tokens
                    if i == 0:
                        first.add(key)
            tokens = sum(tokens_in.values())
            kind = {}
            drafted = [k for k, s in steps.items() if s.draft_rpc_seconds > 0 and k not in first]
            med = statistics.median([steps[k].draft_rpc_seconds for k in drafted]) if drafted else 0
            for k, s in steps.items():
                kind[k] = ("join" if k in first else "catch-up" if s.draft_rpc_seconds > 2 * med and med > 0
                           else "drafted" if s.draft_rpc_seconds > 0 else "plain")
            print(f"{policy} c={c} n={n} round {r}: wall {wall*1e3:.0f} ms, {tokens} tokens, {tokens/wall:.1f} tok/s, "
                  f"{len(steps)} steps ({sum(s.step_seconds for s in steps.values())*1e3:.0f} ms)")
            for name in ("drafted", "plain", "catch-up", "join"):
                ks = [k for k in steps if kind[k] == name]
                if ks:
                    ms = sum(steps[k].step_seconds for k in ks) * 1e3
                    t = sum(tokens_in[k] for k in ks)
                    print(f"  {name:8s} {len(ks):3d} steps {ms:6.0f} ms ({ms/len(ks):5.1f} each), {t:4d} tokens, "
                          f"{t/ms:.3f} tok/ms; draft rpc {sum(steps[k].draft_rpc_seconds for k in ks)*1e3/len(ks):.1f}, "
                          f"verify rpc {sum(steps[k].verify_rpc_seconds for k in ks)*1e3/len(ks):.1f} ms each")

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], 0))
