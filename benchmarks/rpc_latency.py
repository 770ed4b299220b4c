"""Round-trip latency of one small RPC between two processes on loopback: where a CAST step's RPC time goes.

No models. A child process runs a grpc.aio server (TCP 127.0.0.1 and a Unix socket) and a raw asyncio echo server;
this process calls it in each variant and reports p50/p90/p99 per call:

- grpc-aio unary, the handler replies on the event loop, or hops to a 1-worker ThreadPoolExecutor first
  (`run_in_executor`, as draft_service/ and verify_service/ servicers do);
- grpc-aio bidi stream kept open, one message each way per round trip (no per-call HTTP/2 stream, headers, call
  objects);
- the same over a Unix domain socket;
- grpc's sync (threaded) client against the aio server;
- "cast-like": a unary call with the orchestrator's channel options and a per-call timeout (orchestrator/clients.py)
  to the executor handler: what Expand and Verify pay today, less (de)serialization;
- raw asyncio echo (length-prefixed, TCP and UDS, and TCP with the executor hop): the OS and wake-up floor, so
  gRPC's own cost is the difference.

Two payloads: ~400 B request / 64 B reply (a Verify call at batch 1) and ~100 B request / 10 KB reply (an Expand
reply). Variants are measured interleaved in rounds, so noise from other processes on the host hits all alike.

Back to back, every thread on both sides stays awake. Inside a decoding step they do not: each process sleeps while
the other's model works. `--compute-ms C --gap-ms G` makes each call look like one inside a step: the handler
works C ms (sleeps, where the model's forward would run: on the worker thread for `exec`, on the event loop for
`loop`) and reports the time it spent, and the client waits G ms between calls (the other service's turn). The
latency columns are then the round trip minus the handler's reported time, as `cast bench` counts a step's RPC.

    python -m benchmarks.rpc_latency --calls 2000 --out rpc.csv
    python -m benchmarks.rpc_latency --calls 300 --compute-ms 7 --gap-ms 3 --out rpc-in-step.csv

`--keep-awake CPUS` runs the whole measurement with SCHED_IDLE spinners on those CPUs (orchestrator/keep_awake.py),
`--pin CPUS` confines both processes to those CPUs, `--variants a,b` keeps the variants whose names contain a or b.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from cast_runtime.grpc_options import channel_options
from orchestrator.keep_awake import KeepAwake, parse_cpus

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "/bench.Echo/"
# (request bytes, reply bytes)
PAYLOADS = {"verify-400B": (400, 64), "expand-10KB": (100, 10_240)}
CAST_CHANNEL_OPTIONS = channel_options()  # the orchestrator's channels'
BASELINE = "cast-like unary exec tcp"  # the ratio column is p50 / this variant's p50 (same payload)


# ---------------------------------------------------------------- server (child process)

HEADER = struct.Struct("<Id")  # request: reply bytes, seconds of work to do
WORKED = struct.Struct("<d")   # reply: seconds of work done (then padding)


def make_request(request_size: int, reply_size: int, compute_s: float = 0.0) -> bytes:
    """The header says how big a reply the server should send and how long to work first; the rest is padding."""
    return HEADER.pack(reply_size, compute_s) + bytes(max(0, request_size - HEADER.size))


def reply_for(request: bytes) -> bytes:
    """Work (sleep) as asked on the calling thread, then reply with the seconds that took."""
    reply_size, compute_s = HEADER.unpack_from(request)
    start = time.perf_counter()
    if compute_s > 0:
        time.sleep(compute_s)
    return WORKED.pack(time.perf_counter() - start) + bytes(max(0, reply_size - WORKED.size))


async def serve(uds_dir: str) -> None:
    """Start both servers, print their addresses as one JSON line, serve until killed."""
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-worker")  # one, like the servicers

    async def unary_loop(request, context):
        return reply_for(request)

    async def cpu(request, context):  # this process's CPU seconds so far (all threads): the server's share
        return struct.pack("<d", time.process_time())

    async def unary_exec(request, context):
        return await loop.run_in_executor(executor, reply_for, request)

    async def stream_loop(requests, context):
        async for request in requests:
            yield reply_for(request)

    async def stream_exec(requests, context):
        async for request in requests:
            yield await loop.run_in_executor(executor, reply_for, request)

    # No (de)serializers: the handlers see and return bytes.
    handlers = {
        "UnaryLoop": grpc.unary_unary_rpc_method_handler(unary_loop),
        "UnaryExec": grpc.unary_unary_rpc_method_handler(unary_exec),
        "StreamLoop": grpc.stream_stream_rpc_method_handler(stream_loop),
        "StreamExec": grpc.stream_stream_rpc_method_handler(stream_exec),
        "Cpu": grpc.unary_unary_rpc_method_handler(cpu),
    }
    server = grpc.aio.server(options=[("grpc.keepalive_permit_without_calls", 1),
                                      ("grpc.http2.min_ping_interval_without_data_ms", 10_000)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.strip("/"), handlers),))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    grpc_uds = f"unix://{uds_dir}/grpc.sock"
    server.add_insecure_port(grpc_uds)
    await server.start()

    async def raw_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Frame: request = <u32 length><u8 hop><body>; reply = <u32 length><body>.
        try:
            while True:
                length, hop = struct.unpack("<IB", await reader.readexactly(5))
                request = await reader.readexactly(length)
                reply = await loop.run_in_executor(executor, reply_for, request) if hop else reply_for(request)
                writer.write(struct.pack("<I", len(reply)) + reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    raw_tcp = await asyncio.start_server(raw_echo, "127.0.0.1", 0)  # asyncio sets TCP_NODELAY, as gRPC does
    raw_uds_path = f"{uds_dir}/raw.sock"
    raw_uds = await asyncio.start_unix_server(raw_echo, raw_uds_path)
    print(json.dumps({"grpc_tcp": f"127.0.0.1:{grpc_port}", "grpc_uds": grpc_uds,
                      "raw_tcp": raw_tcp.sockets[0].getsockname()[1], "raw_uds": raw_uds_path}), flush=True)
    await server.wait_for_termination()


# ---------------------------------------------------------------- clients (this process)

@dataclass(frozen=True)
class Variant:
    name: str
    client: str          # "aio-unary", "aio-stream", "sync-unary" or "raw"
    address: str         # key of the server's address line
    method: str = ""     # gRPC method; for raw, "" (reply on the loop) or "exec" (hop to the worker)
    options: tuple = ()  # channel options
    timeout: float | None = None


VARIANTS = [
    Variant("grpc-aio unary loop tcp", "aio-unary", "grpc_tcp", "UnaryLoop"),
    Variant("grpc-aio unary exec tcp", "aio-unary", "grpc_tcp", "UnaryExec"),
    Variant(BASELINE, "aio-unary", "grpc_tcp", "UnaryExec", tuple(CAST_CHANNEL_OPTIONS), 30.0),
    Variant("grpc-aio unary exec tcp noretry", "aio-unary", "grpc_tcp", "UnaryExec", (("grpc.enable_retries", 0),)),
    Variant("grpc-aio stream loop tcp", "aio-stream", "grpc_tcp", "StreamLoop"),
    Variant("grpc-aio stream exec tcp", "aio-stream", "grpc_tcp", "StreamExec"),
    Variant("grpc-aio unary loop uds", "aio-unary", "grpc_uds", "UnaryLoop"),
    Variant("grpc-aio unary exec uds", "aio-unary", "grpc_uds", "UnaryExec"),
    Variant("grpc-aio stream exec uds", "aio-stream", "grpc_uds", "StreamExec"),
    Variant("grpc-sync unary loop tcp", "sync-unary", "grpc_tcp", "UnaryLoop"),
    Variant("grpc-sync unary exec tcp", "sync-unary", "grpc_tcp", "UnaryExec"),
    Variant("raw asyncio loop tcp", "raw", "raw_tcp"),
    Variant("raw asyncio exec tcp", "raw", "raw_tcp", "exec"),
    Variant("raw asyncio loop uds", "raw", "raw_uds"),
]


async def open_client(v: Variant, addresses: dict):
    """(call, close): call(request) -> reply does one round trip; close() releases the connection."""
    address = addresses[v.address]
    if v.client == "aio-unary":
        channel = grpc.aio.insecure_channel(address, options=list(v.options))
        rpc = channel.unary_unary(SERVICE + v.method, _registered_method=True)
        timeout = v.timeout

        async def call(request):
            return await rpc(request, timeout=timeout)
        return call, channel.close
    if v.client == "aio-stream":
        channel = grpc.aio.insecure_channel(address, options=list(v.options))
        stream = channel.stream_stream(SERVICE + v.method, _registered_method=True)()

        async def call(request):
            await stream.write(request)
            return await stream.read()

        async def close():
            await stream.done_writing()
            await channel.close()
        return call, close
    if v.client == "sync-unary":
        # Blocks the event loop while it runs: nothing else runs here meanwhile, so that is harmless.
        channel = grpc.insecure_channel(address, options=list(v.options))
        rpc = channel.unary_unary(SERVICE + v.method, _registered_method=True)

        async def call(request):
            return rpc(request)

        async def close():
            channel.close()
        return call, close
    if v.client == "raw":
        if v.address == "raw_uds":
            reader, writer = await asyncio.open_unix_connection(address)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", address)
        hop = 1 if v.method == "exec" else 0

        async def call(request):
            writer.write(struct.pack("<IB", len(request), hop) + request)
            (length,) = struct.unpack("<I", await reader.readexactly(4))
            return await reader.readexactly(length)

        async def close():
            writer.close()
            await writer.wait_closed()
        return call, close
    raise ValueError(v.client)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


async def measure(addresses: dict, calls: int, warmup: int, rounds: int, variants=VARIANTS, compute_s: float = 0.0,
                  gap_s: float = 0.0) -> list[dict]:
    """Every (variant, payload) gets `calls` timed round trips, spread over `rounds` interleaved rounds. Each sample
    is the round trip less the handler's reported work (compute_s); gap_s: the client's idle time between calls."""
    clients = {v.name: await open_client(v, addresses) for v in variants}
    requests = {p: make_request(*sizes, compute_s) for p, sizes in PAYLOADS.items()}
    samples = {(v.name, p): [] for v in variants for p in PAYLOADS}
    cpu = {key: [0.0, 0.0] for key in samples}  # CPU seconds spent during the timed calls: [client, server]
    probe_channel = grpc.aio.insecure_channel(addresses["grpc_tcp"])
    probe = probe_channel.unary_unary(SERVICE + "Cpu", _registered_method=True)

    async def server_cpu() -> float:
        return struct.unpack("<d", await probe(b""))[0]
    try:
        for v in variants:  # warm-up: connections, HTTP/2 windows, the worker thread, code paths
            call = clients[v.name][0]
            for p, request in requests.items():
                for _ in range(warmup):
                    await call(request)
        per_round = [calls // rounds + (1 if r < calls % rounds else 0) for r in range(rounds)]
        for n in per_round:
            for v in variants:
                call = clients[v.name][0]
                for p, request in requests.items():
                    out = samples[(v.name, p)]
                    reply_size = PAYLOADS[p][1]
                    server0, client0 = await server_cpu(), time.process_time()
                    for _ in range(n):
                        start = time.perf_counter_ns()
                        reply = await call(request)
                        out.append((time.perf_counter_ns() - start) / 1e6 - WORKED.unpack_from(reply)[0] * 1e3)
                        if gap_s > 0:
                            await asyncio.sleep(gap_s)
                    client1, server1 = time.process_time(), await server_cpu()
                    cpu[(v.name, p)][0] += client1 - client0
                    cpu[(v.name, p)][1] += server1 - server0  # includes one probe call's share: ~0.1 ms a batch
                    if len(reply) != reply_size:
                        raise RuntimeError(f"{v.name}: reply of {len(reply)} bytes, expected {reply_size}")
    finally:
        for _, close in clients.values():
            await close()
        await probe_channel.close()
    rows = []
    for (name, payload), values in samples.items():
        values.sort()
        client_cpu, server_cpu_s = cpu[(name, payload)]
        rows.append(dict(variant=name, payload=payload, calls=len(values), p50_ms=percentile(values, 50),
                         p90_ms=percentile(values, 90), p99_ms=percentile(values, 99),
                         client_cpu_ms=client_cpu / len(values) * 1e3, server_cpu_ms=server_cpu_s / len(values) * 1e3))
    base = {r["payload"]: r["p50_ms"] for r in rows if r["variant"] == BASELINE}
    for r in rows:
        r["p50_vs_cast"] = r["p50_ms"] / base[r["payload"]] if r["payload"] in base else float("nan")
    return rows


def start_server(uds_dir: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.rpc_latency", "--serve", uds_dir], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"benchmark server exited with {proc.returncode} before it was ready")
    return proc, json.loads(line)


def run(calls: int, warmup: int, rounds: int, variants=VARIANTS, compute_s: float = 0.0, gap_s: float = 0.0) -> list[dict]:
    uds_dir = tempfile.mkdtemp(prefix="rpc_latency_", dir="/tmp")  # short path: sun_path holds ~107 bytes
    proc, addresses = start_server(uds_dir)
    try:
        return asyncio.run(measure(addresses, calls, warmup, rounds, variants, compute_s, gap_s))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(uds_dir, ignore_errors=True)


FIELDS = ["variant", "payload", "calls", "p50_ms", "p90_ms", "p99_ms", "p50_vs_cast", "client_cpu_ms", "server_cpu_ms"]


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in FIELDS})


def format_table(rows: list[dict]) -> str:
    """Per payload, fastest first. cpu columns: mean CPU ms per call (all threads) of each process."""
    lines = [f"{'variant':32} {'payload':11} {'p50_ms':>7} {'p90_ms':>7} {'p99_ms':>7} {'p50/cast':>8} "
             f"{'cli_cpu':>7} {'srv_cpu':>7}"]
    for r in sorted(rows, key=lambda r: (r["payload"] != "verify-400B", r["payload"], r["p50_ms"])):
        lines.append(f"{r['variant']:32} {r['payload']:11} {r['p50_ms']:7.3f} {r['p90_ms']:7.3f} "
                     f"{r['p99_ms']:7.3f} {r['p50_vs_cast']:8.2f} {r['client_cpu_ms']:7.3f} {r['server_cpu_ms']:7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed round trips per variant and payload")
    parser.add_argument("--warmup", type=int, default=100, help="untimed round trips per variant and payload")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds the calls are spread over")
    parser.add_argument("--compute-ms", type=float, default=0.0,
                        help="ms the handler works per call (excluded from the latency), as a model would in a step")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="ms the client idles between calls")
    parser.add_argument("--keep-awake", metavar="CPUS", help="SCHED_IDLE spinners on these CPUs meanwhile ('all', 0-3)")
    parser.add_argument("--pin", metavar="CPUS", help="run both processes on these CPUs only")
    parser.add_argument("--variants", help="comma-separated substrings: keep the variants whose names contain one")
    parser.add_argument("--out", help="CSV file to write")
    parser.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)  # the child process
    a = parser.parse_args(argv)
    if a.serve:
        asyncio.run(serve(a.serve))
        return
    variants = VARIANTS
    if a.variants:
        wanted = [w.strip() for w in a.variants.split(",")]
        variants = [v for v in VARIANTS if v.name == BASELINE or any(w in v.name for w in wanted)]
    if a.pin:
        os.sched_setaffinity(0, parse_cpus(a.pin))  # the server child inherits it
    spinners = KeepAwake(parse_cpus(a.keep_awake) if a.keep_awake else [])
    with spinners:
        rounds = max(1, min(a.rounds, a.calls))
        rows = run(a.calls, a.warmup, rounds, variants, a.compute_ms / 1e3, a.gap_ms / 1e3)
    print(format_table(rows))
    if a.out:
        write_csv(rows, a.out)


if __name__ == "__main__":
    main()
