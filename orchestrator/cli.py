"""`cast`: run the services, generate text, train and benchmark.

    cast up                      the three services on loopback with the default model pair; prints `ready ADDR`
                                 (and serves the OpenAI-compatible HTTP API on :8000)
    cast generate [...] PROMPT   one request to a running orchestrator (PROMPT -: from standard input)
    cast replicas [--addr A]     the draft and verify replicas an orchestrator sees, their state and load
    cast serve draft|verify|orchestrator [...]
    cast bench [...]             a bounded load test: throughput, TTFT, TPOT per policy and concurrency
    cast sweep [...]             CAST against every fixed tree shape of a grid, per concurrency (the oracle)
    cast soak --minutes N        a bounded soak on loopback: mixed load, cancels, deadlines, replicas killed
    cast profile verify|draft    measure a service's cost table f(B, c, n) on this machine (JSON, optional plot)
    cast train-reference [...]   build the project's reference model pair
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path


def cmd_up(argv: list[str]) -> int:
    from orchestrator.keep_awake import parse_cpus
    from orchestrator.stack import Stack, StackSpec, default_pair

    p = argparse.ArgumentParser(prog="cast up", description="Start draft, verify and orchestrator on loopback.")
    p.add_argument("--target", type=Path, help="target checkpoint dir (default: the reference pair)")
    p.add_argument("--draft", type=Path, help="draft checkpoint dir (default: the reference pair's; none when "
                   "--target is given alone: the target drafts for itself with the sparse and lookup levels)")
    p.add_argument("--draft-levels", default=None,
                   help="levels served beside the draft (comma-separated, of sparse and lookup; '' for none): "
                        "the `cascade` policy and its per-level policies use them; sparse=DIR serves a checkpoint "
                        "that `python -m draft_service.sparse` wrote (default: lookup with a draft model; sparse,lookup "
                        "without one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--draft-port", type=int, default=50052)
    p.add_argument("--verify-port", type=int, default=50053)
    p.add_argument("--http-port", type=int, default=8000,
                   help="the orchestrator's OpenAI-compatible HTTP API and demo page (-1: off)")
    p.add_argument("--metrics-port", type=int, default=9464,
                   help="Prometheus metrics at /metrics: the orchestrator's on this port, draft replica i's on "
                        "+1+2i, verify replica i's on +2+2i (0: off)")
    p.add_argument("--trace", choices=("console", "otlp", "none"), default=None,
                   help="where the services send spans: console (one line per span on standard output), otlp "
                        "(OTEL_EXPORTER_OTLP_ENDPOINT), none; default: as OTEL_TRACES_EXPORTER and the endpoint say")
    p.add_argument("--verify-dtype", default="auto")
    p.add_argument("--draft-replicas", type=int, default=1, help="draft services to start (ports draft-port + 2 i)")
    p.add_argument("--verify-replicas", type=int, default=1, help="verify services to start (ports verify-port + 2 i)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the services to be ready")
    p.add_argument("--keep-cpus-awake", metavar="CPUS", default="",
                   help="'all' or e.g. 0-7: SCHED_IDLE spinners keep these CPUs from halting between a step's "
                        "messages (cuts RPC time on VMs; costs power; see orchestrator/keep_awake.py)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate every service serves TLS with (names the host)")
    p.add_argument("--tls-key", type=Path, help="its PEM private key")
    p.add_argument("--tls-ca", type=Path, help="PEM CA that signed --tls-cert (the orchestrator trusts it)")
    p.add_argument("--mtls", action="store_true", help="the draft and verify services accept only clients with a "
                   "certificate --tls-ca signed (the orchestrator shows --tls-cert)")
    p.add_argument("--auth-tokens", type=Path, help="token file: the public APIs require bearer tokens")
    p.add_argument("--pipeline", choices=("on", "off"), default=None,
                   help="draft the next step's tree while a step is verified (default: the orchestrator's)")
    a = p.parse_args(argv)
    if (a.tls_cert is None) != (a.tls_key is None) or (a.tls_cert is not None and a.tls_ca is None):
        p.error("--tls-cert, --tls-key and --tls-ca go together")
    if a.mtls and a.tls_cert is None:
        p.error("--mtls needs --tls-cert, --tls-key and --tls-ca")
    try:
        keep_awake = parse_cpus(a.keep_cpus_awake) if a.keep_cpus_awake else []
    except ValueError as e:
        p.error(str(e))
    target, draft = (a.target, a.draft) if a.target else default_pair()
    if a.draft_levels is None:  # a sparse copy of a large target takes minutes to export: only where no draft exists
        a.draft_levels = "lookup" if draft is not None else "sparse,lookup"
    levels = tuple(x for x in a.draft_levels.split(",") if x)
    if {x.partition("=")[0] for x in levels} - {"sparse", "lookup"}:
        p.error(f"--draft-levels: {a.draft_levels!r}: only sparse and lookup (the draft is level small)")
    if draft is None and not any(x.startswith("sparse") for x in levels):
        p.error("without --draft the draft service needs the sparse level")
    if a.draft_replicas < 1 or a.verify_replicas < 1:
        p.error("--draft-replicas and --verify-replicas must be at least 1")
    spec = StackSpec(target, draft, a.host, a.port, a.draft_port, a.verify_port, a.verify_dtype,
                     keep_cpus_awake=keep_awake, http_port=a.http_port if a.http_port >= 0 else None,
                     draft_replicas=a.draft_replicas, verify_replicas=a.verify_replicas, draft_levels=levels,
                     metrics_port=a.metrics_port or None, env={"OTEL_TRACES_EXPORTER": a.trace} if a.trace else {},
                     tls_cert=a.tls_cert, tls_key=a.tls_key, tls_ca=a.tls_ca, mtls=a.mtls, auth_tokens=a.auth_tokens,
                     orchestrator_args=["--pipeline", a.pipeline] if a.pipeline else [])
    stack = Stack(spec)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"starting: target {target}, draft {draft or '(none)'}, levels {', '.join(levels) or '(none)'}",
          file=sys.stderr, flush=True)
    stack.start()
    try:
        stack.wait_ready(a.timeout)
        print(f"ready {spec.address}", flush=True)
        if spec.http_url:
            url = spec.http_url.replace("http:", "https:") if spec.tls_cert else spec.http_url
            print(f"http {url} (OpenAI-compatible API under /v1; the demo page at /)", flush=True)
        if spec.metrics_port:
            print("metrics " + " ".join(f"{name}=http://{a.host}:{port}/metrics"
                                        for name, port in spec.metrics_ports().items()), flush=True)
        # A replica that exits is the orchestrator's to route around (its sequences move); the stack stops when
        # the orchestrator does, or when no replica of a service is left.
        reported: set[str] = set()
        while True:
            exited = {n for n, proc in stack.processes.items() if proc.poll() is not None}
            for name in sorted(exited - reported):
                print(f"the {name} service exited", file=sys.stderr, flush=True)
            reported |= exited
            roles = {"orchestrator": ["orchestrator"], **{r: list(spec.replica_addresses(r)) for r in ("draft", "verify")}}
            if any(all(n in exited for n in names) for names in roles.values()):
                print("stopping", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


def cmd_generate(argv: list[str]) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from cast.v1 import generation_pb2, generation_pb2_grpc
    from orchestrator.auth import add_client_flags, bearer, public_channel

    p = argparse.ArgumentParser(prog="cast generate", description="Generate a completion.")
    p.add_argument("prompt", help="the prompt; - reads it, verbatim, from standard input")
    p.add_argument("--addr", default="127.0.0.1:50051")
    p.add_argument("--policy", default="", help="cast, eagle2, chain, ar, cascade, cascade-fixed, small, sparse or lookup (default: the server's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--seed", type=int, default=None, help="the same seed and request give the same output")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true",
                   help="print the whole response with its stats; with --stream, one JSON object per chunk (JSON lines)")
    p.add_argument("--stats", action="store_true", help="then print tokens/s and tokens per step on stderr")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    add_client_flags(p)
    a = p.parse_args(argv)
    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    request = generation_pb2.GenerateRequest(
        prompt=prompt, max_new_tokens=a.max_new_tokens, policy=a.policy, stop=a.stop, ignore_eos=a.ignore_eos,
        temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed, return_step_stats=a.json,
    )

    def as_json(message) -> str:
        return json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=None if a.stream else 2)

    with public_channel(a.addr, a.tls_ca) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        try:
            if a.stream:
                for last in stub.GenerateStream(request, timeout=a.timeout, metadata=bearer(a.token)):
                    if a.json:
                        print(as_json(last), flush=True)
                    else:
                        print(last.text, end="", flush=True)
                if not a.json:
                    print()
            else:
                last = stub.Generate(request, timeout=a.timeout, metadata=bearer(a.token))
                print(as_json(last) if a.json else last.text)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if a.stats:  # the last message carries the request's usage and stats
        tokens, stats = last.usage.completion_tokens, last.stats
        print(f"{tokens} tokens in {stats.total_seconds:.2f} s: {tokens / max(stats.total_seconds, 1e-9):.1f} "
              f"tokens/s, {stats.mean_accepted_length:.2f} tokens/step ({stats.steps} steps, policy {stats.policy})",
              file=sys.stderr)
    return 0


def cmd_replicas(argv: list[str]) -> int:
    import grpc

    from cast.v1 import generation_pb2, generation_pb2_grpc
    from orchestrator.auth import add_client_flags, bearer, public_channel

    p = argparse.ArgumentParser(prog="cast replicas", description="The replicas an orchestrator sees.")
    p.add_argument("--addr", default="127.0.0.1:50051")
    add_client_flags(p)
    a = p.parse_args(argv)
    with public_channel(a.addr, a.tls_ca) as channel:
        try:
            reply = generation_pb2_grpc.GenerationServiceStub(channel).ListReplicas(
                generation_pb2.ListReplicasRequest(), timeout=10, metadata=bearer(a.token))
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{'role':7} {'address':22} {'state':9} {'live':>5} {'slots':>5}  device")
    for r in reply.replicas:
        print(f"{r.role:7} {r.address:22} {r.state:9} {r.live_sequences:5} {r.max_sequences or '-':>5}  {r.device}")
    print(f"sequences replayed since start: {reply.replays}")
    return 0


def cmd_serve(argv: list[str]) -> int:
    if not argv or argv[0] not in ("draft", "verify", "orchestrator"):
        print("usage: cast serve draft|verify|orchestrator [flags]", file=sys.stderr)
        return 2
    service, rest = argv[0], argv[1:]
    if service == "draft":
        from draft_service.server import main
    elif service == "verify":
        from verify_service.server import main
    else:
        from orchestrator.server import main
    main(rest)
    return 0


def cmd_train_reference(argv: list[str]) -> int:
    from cast_models.train_reference import main

    main(argv)
    return 0


def cmd_bench(argv: list[str]) -> int:
    from benchmarks.bench import main

    return main(argv)


def cmd_sweep(argv: list[str]) -> int:
    from benchmarks.sweep import main

    return main(argv)


def cmd_soak(argv: list[str]) -> int:
    from benchmarks.soak import main

    return main(argv)


def cmd_profile(argv: list[str]) -> int:
    from orchestrator.profile_cmd import main

    return main(argv)


COMMANDS = {"up": cmd_up, "bench": cmd_bench, "sweep": cmd_sweep, "soak": cmd_soak, "generate": cmd_generate,
            "replicas": cmd_replicas, "serve": cmd_serve,
            "train-reference": cmd_train_reference, "profile": cmd_profile}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[argv[0]](argv[1:]))


if __name__ == "__main__":
    main()
