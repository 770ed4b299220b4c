"""Many replicas, real processes on loopback (reference pair): sequences spread over 2 draft and 2 verify replicas,
and no request fails or changes when replicas die, drain or appear.

Verify replicas are found through DNS: a server of the test's own (dnslib) answers every A record of one name, each
replica on its own loopback address and the same port, as a Kubernetes headless Service gives them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from cast.v1 import generation_pb2, generation_pb2_grpc
from orchestrator.stack import REFERENCE_PAIR, free_ports, is_serving
from tests.integration.stacks import prompts_for_tests

NAME = "verify.cast.test."
NEW_TOKENS = 96


class Zone(BaseResolver):
    """Answers A queries for NAME from a list the test changes."""

    def __init__(self, hosts: list[str]) -> None:
        self.hosts = list(hosts)

    def resolve(self, request, handler):
        reply = request.reply()
        if str(request.q.qname) == NAME and request.q.qtype == QTYPE.A:
            for host in self.hosts:
                reply.add_answer(RR(NAME, QTYPE.A, rdata=A(host), ttl=1))
        return reply


@dataclass
class Fleet:
    processes: dict[str, subprocess.Popen]
    commands: dict[str, list[str]]
    addresses: dict[str, str]
    zone: Zone
    stub: generation_pb2_grpc.GenerationServiceStub
    logs: object

    def start(self, name: str) -> None:
        self.processes[name] = subprocess.Popen(self.commands[name], stdout=self.logs, stderr=subprocess.STDOUT)

    def wait_serving(self, name: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not is_serving(self.addresses[name]):
            assert self.processes[name].poll() is None, f"{name} exited"
            assert time.monotonic() < deadline, f"{name} not serving after {timeout_s} s"
            time.sleep(0.2)

    def replicas(self) -> dict[str, generation_pb2.ReplicaStatus]:
        reply = self.stub.ListReplicas(generation_pb2.ListReplicasRequest(), timeout=10)
        return {r.address: r for r in reply.replicas}

    def replays(self) -> int:
        return self.stub.ListReplicas(generation_pb2.ListReplicasRequest(), timeout=10).replays

    def wait_seen(self, name: str, state: str = "serving", timeout_s: float = 60) -> None:
        """Until the orchestrator sees the replica in that state."""
        deadline = time.monotonic() + timeout_s
        while (r := self.replicas().get(self.addresses[name])) is None or r.state != state:
            assert time.monotonic() < deadline, f"the orchestrator does not see {name} {state}: {r}"
            time.sleep(0.1)

    def busiest(self, role: str) -> str:
        """The replica of a role with the most of the orchestrator's live sequences."""
        names = [n for n in self.addresses if n.startswith(role)]
        live = self.replicas()
        return max(names, key=lambda n: live[self.addresses[n]].live_sequences if self.addresses[n] in live else -1)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, onnx_cache_dir):
    target, draft = REFERENCE_PAIR / "target", REFERENCE_PAIR / "draft"
    port, draft1, draft2, verify_port = free_ports(4)
    zone = Zone(["127.0.0.1", "127.0.0.2"])
    dns = DNSServer(zone, address="127.0.0.1", port=free_ports(1)[0], logger=DNSLogger(logf=lambda _: None))
    dns.start_thread()
    py = sys.executable
    commands, addresses = {}, {}
    for name, p in (("draft-1", draft1), ("draft-2", draft2)):
        addresses[name] = f"127.0.0.1:{p}"
        commands[name] = [py, "-m", "draft_service.server", "--model", str(draft), "--host", "127.0.0.1",
                          "--port", str(p), "--no-profile"]
    for i in (1, 2, 3):
        addresses[f"verify-{i}"] = f"127.0.0.{i}:{verify_port}"
        commands[f"verify-{i}"] = [py, "-m", "verify_service.server", "--model", str(target), "--host", f"127.0.0.{i}",
                                   "--port", str(verify_port), "--dtype", "float64", "--no-profile", "--grace-s", "30"]
    addresses["orchestrator"] = f"127.0.0.1:{port}"
    commands["orchestrator"] = [
        py, "-m", "orchestrator.server", "--tokenizer", str(target), "--port", str(port), "--refresh", "0.3",
        "--draft", f"{addresses['draft-1']},{addresses['draft-2']}",
        "--verify", f"dns://127.0.0.1:{dns.server.server_address[1]}/{NAME.rstrip('.')}:{verify_port}"]
    logs = open(tmp_path_factory.mktemp("replicas") / "services.log", "w")
    channel = grpc.insecure_channel(addresses["orchestrator"])
    running = Fleet({}, commands, addresses, zone, generation_pb2_grpc.GenerationServiceStub(channel), logs)
    try:
        for name in ("draft-1", "draft-2", "verify-1", "verify-2", "orchestrator"):
            running.start(name)
        for name in ("draft-1", "draft-2", "verify-1", "verify-2", "orchestrator"):
            running.wait_serving(name)
        yield running
    finally:
        for proc in running.processes.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        channel.close()
        dns.stop()
        logs.close()


def requests() -> list[generation_pb2.GenerateRequest]:
    """8 greedy requests of 96 tokens, and one seeded sampled request."""
    greedy = [generation_pb2.GenerateRequest(prompt=p, max_new_tokens=NEW_TOKENS, ignore_eos=True)
              for p in prompts_for_tests(8)]
    sampled = generation_pb2.GenerateRequest(prompt="def parse(line):", max_new_tokens=NEW_TOKENS, ignore_eos=True,
                                             temperature=0.8, top_k=40, seed=1234)
    return greedy + [sampled]


def run(fleet: Fleet, fault=None) -> tuple[list[list[int]], float]:
    """Every request's tokens, streamed concurrently, and the wall time. `fault` runs once every request has its
    first tokens (all are live)."""
    reqs = requests()
    started = threading.Barrier(len(reqs) + 1, timeout=120)

    def one(request) -> list[int]:
        tokens: list[int] = []
        first = True
        for chunk in fleet.stub.GenerateStream(request, timeout=300):
            tokens += chunk.token_ids
            if first:
                first = False
                started.wait()
        return tokens

    begin = time.perf_counter()
    with ThreadPoolExecutor(len(reqs)) as pool:
        futures = [pool.submit(one, r) for r in reqs]
        started.wait()
        if fault is not None:
            fault()
        outputs = [f.result() for f in futures]
    return outputs, time.perf_counter() - begin


@pytest.fixture(scope="module")
def expected(fleet) -> tuple[list[list[int]], float]:
    """The outputs and wall time with nothing failing."""
    outputs, _ = run(fleet)  # the first run pays one-time costs
    outputs_again, seconds = run(fleet)
    assert outputs_again == outputs
    assert all(len(o) == NEW_TOKENS for o in outputs)
    return outputs, seconds


def report(what: str, fleet: Fleet, replays_before: int, seconds: float, baseline: float) -> None:
    print(f"\n{what}: {fleet.replays() - replays_before} sequences replayed, {seconds:.2f} s against {baseline:.2f} s "
          f"with nothing failing (+{seconds - baseline:.2f} s)")


def test_sequences_spread_over_every_replica(fleet, expected):
    seen = {}

    def look():
        seen.update({a: r.live_sequences for a, r in fleet.replicas().items()})

    outputs, _ = run(fleet, fault=look)
    assert outputs == expected[0]
    for name in ("draft-1", "draft-2", "verify-1", "verify-2"):
        assert seen[fleet.addresses[name]] > 0, (name, seen)


def test_sigkill_of_a_verify_replica_fails_and_changes_nothing(fleet, expected):
    victim = fleet.busiest("verify")
    before = fleet.replays()
    outputs, seconds = run(fleet, fault=lambda: fleet.processes[victim].send_signal(signal.SIGKILL))
    report(f"SIGKILL {victim}", fleet, before, seconds, expected[1])
    assert outputs == expected[0]  # the seeded sampled request too
    assert fleet.replays() > before
    fleet.start(victim)
    fleet.wait_serving(victim)
    fleet.wait_seen(victim)


def test_sigkill_of_every_draft_replica_slows_requests_and_fails_none(fleet, expected):
    before = fleet.replays()

    def kill_drafts():
        for name in ("draft-1", "draft-2"):
            fleet.processes[name].send_signal(signal.SIGKILL)

    outputs, seconds = run(fleet, fault=kill_drafts)
    report("SIGKILL every draft replica", fleet, before, seconds, expected[1])
    assert outputs == expected[0]
    for name in ("draft-1", "draft-2"):
        fleet.start(name)
    for name in ("draft-1", "draft-2"):
        fleet.wait_serving(name)
        fleet.wait_seen(name)
    outputs, _ = run(fleet)  # speculation again
    assert outputs == expected[0]


def test_sigterm_drains_a_verify_replica_without_failing_a_request(fleet, expected):
    victim = fleet.busiest("verify")
    before = fleet.replays()
    outputs, seconds = run(fleet, fault=lambda: fleet.processes[victim].send_signal(signal.SIGTERM))
    report(f"SIGTERM {victim}", fleet, before, seconds, expected[1])
    assert outputs == expected[0]
    assert fleet.replays() > before  # its sequences moved while it drained
    assert fleet.processes[victim].wait(timeout=30) == 0  # ... and it left once they had, well within its grace
    fleet.start(victim)
    fleet.wait_serving(victim)
    fleet.wait_seen(victim)


def test_a_verify_replica_added_to_dns_takes_new_sequences(fleet, expected):
    fleet.start("verify-3")
    fleet.wait_serving("verify-3")
    seen = []

    def add_and_watch():
        fleet.zone.hosts.append("127.0.0.3")
        fleet.wait_seen("verify-3")

    outputs, _ = run(fleet, fault=add_and_watch)
    assert outputs == expected[0]
    # The running requests stay where they are; the next ones go to the new replica first (the least loaded).
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(fleet.replicas()[fleet.addresses["verify-3"]].live_sequences)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        outputs, _ = run(fleet)
    finally:
        done.set()
        watcher.join()
    assert outputs == expected[0]
    assert max(seen) > 0
