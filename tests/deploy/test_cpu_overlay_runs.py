"""The cpu overlay's own commands start a working system: each Deployment's container (the image's ENTRYPOINT and
the manifest's args, env and ports, as rendered by kustomize) runs as a process on loopback, and a Generate call
through the orchestrator's Service answers.

What a cluster gives a pod, the test gives a process, and nothing else is changed:
- A pod's address: every pod gets its own loopback address, 127.R.S.N (R, S random per run), so the manifests' fixed
  ports (50051-50053, 9464) never collide with other tests or runs; a setting of 0.0.0.0 (all of the pod's
  addresses) becomes the pod's address.
- Cluster DNS: a DNS server of the test's (dnslib) answers each Service's name (short and long forms) with the
  addresses of the pods it selects. The system resolver here cannot be pointed at it (no writable /etc/hosts), so
  the orchestrator's `dns:///NAME:PORT` targets become `dns://SERVER:PORT/NAME:PORT`: the same name and port, asked of
  that server (orchestrator/discovery.py). A URL naming a Service (the OTLP endpoint) gets the address its name
  resolves to.
- Volumes: each mount path maps to a folder: the models claim to a folder that the demo-models Job (run here too, with
  the image's /opt/cast/reference holding a tiny random pair) fills, emptyDirs to fresh folders (the cache to the test
  session's, which already holds the tiny draft's export); the image's paths (/opt/venv) to this Python's.
- The image: the Dockerfile's runtime ENV and ENTRYPOINT; `cast` is pyproject's console script, run as
  `python -m orchestrator.cli`. Init containers run first, as the kubelet runs them.
- The OpenTelemetry Collector's address gets a gRPC sink that records what the services export.
Readiness is the probes' own check: grpc.health.v1 Check of the probe's service on the probe's port.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import subprocess
import sys
import time
import tomllib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import dns.resolver
import grpc
import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cast.v1 import generation_pb2, generation_pb2_grpc
from cast_models.tiny import make_tiny_pair
from orchestrator.stack import free_ports
from tests.deploy.k8s import (DEPLOY, K8S, REPO_ROOT, container_env, container_port, image_entrypoint, image_env,
                              image_workdir,
                              matches, objects, pod_labels, pod_spec, render)

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 180


class ClusterDNS(BaseResolver):
    """A records for Service names."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}

    def add(self, service: str, namespace: str, addresses: list[str]) -> None:
        for name in (service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
                     f"{service}.{namespace}.svc.cluster.local"):
            self.records[name + "."] = addresses

    def resolve(self, request, handler):
        reply = request.reply()
        if request.q.qtype == QTYPE.A:
            for address in self.records.get(str(request.q.qname), []):
                reply.add_answer(RR(str(request.q.qname), QTYPE.A, rdata=A(address), ttl=1))
        return reply


class OtlpSink(grpc.GenericRpcHandler):
    """Accepts any unary call (OTLP's Export) and keeps (method, raw request)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def service(self, details):
        def handle(request: bytes, context) -> bytes:
            self.calls.append((details.method, request))
            return b""  # an empty Export*ServiceResponse

        return grpc.unary_unary_rpc_method_handler(handle)


@dataclass
class Pod:
    name: str
    address: str
    workload: dict
    process: subprocess.Popen | None = None
    log: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def container(self) -> dict:
        return pod_spec(self.workload)["containers"][0]

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log and self.log.exists() else ""


@dataclass
class Cluster:
    docs: list[dict]
    namespace: str
    pods: dict[str, Pod]        # by Deployment name
    dns: DNSServer
    zone: ClusterDNS
    sink: OtlpSink

    def resolve(self, service: str) -> list[str]:
        """A Service's name through the cluster's DNS, as a client in the cluster would."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = ["127.0.0.1"], self.dns.server.server_address[1]
        return sorted(r.address for r in resolver.resolve(service, "A", lifetime=2))

    def service_address(self, service: str, port_name: str) -> str:
        """NAME:PORT of a Service's port, resolved as kube-proxy would: the pod's address and the targetPort."""
        svc = objects(self.docs, "Service")[service]
        [port] = [p for p in svc["spec"]["ports"] if p["name"] == port_name]
        [pod] = [p for p in self.pods.values() if matches(svc["spec"]["selector"], pod_labels(p.workload))]
        [address] = self.resolve(service)
        assert address == pod.address
        return f"{address}:{container_port(pod.container, port['targetPort'])}"


def cast_console_script() -> list[str]:
    """The `cast` command of the image: pyproject's console script, run by this Python."""
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["cast"].partition(":")
    assert function == "main"
    return [sys.executable, "-m", module]


def map_paths(text: str, paths: dict[str, Path]) -> str:
    """Container paths in `text` (an argument, an env value, a shell script) to the host folders standing for them."""
    if not paths:
        return text
    alternatives = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
    # One pass, so that a folder a path became is not mapped again (/var/cache/cast -> /tmp/... is no /tmp).
    return re.sub(rf"(?<![\w/.])({alternatives})(?=/|$|[\s'\";:])", lambda m: str(paths[m[1]]), text)


def translate(value: str, pod: Pod, dns_server: str, service_addresses: dict[str, str], paths: dict[str, Path]) -> str:
    if value == "0.0.0.0":
        return pod.address
    if value.startswith("dns:///"):
        return f"dns://{dns_server}/{value[len('dns:///'):]}"
    value = re.sub(r"^(\w+://)([\w.-]+)(?=:\d)", lambda m: m[1] + service_addresses.get(m[2], m[2]), value)
    return map_paths(value, paths)


def volume_paths(workload: dict, container: dict, folders: dict[str, Path]) -> dict[str, Path]:
    """The container's mount paths -> the host folders of their volumes (`folders` by volume name)."""
    return {m["mountPath"]: folders[m["name"]] for m in container.get("volumeMounts", [])}


def run_to_completion(argv: list[str], env: dict[str, str], what: str, timeout_s: float = 30) -> None:
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert out.returncode == 0, f"{what} failed ({out.returncode}):\n{out.stdout}{out.stderr}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, onnx_cache_dir):
    docs = render(K8S / "overlays" / "cpu")
    namespace = objects(docs, "Namespace").popitem()[0]
    work = tmp_path_factory.mktemp("cpu-overlay")
    # The demo image's /opt/cast/reference, with a tiny random pair in the reference pair's place.
    image_reference = work / "image-reference"
    make_tiny_pair(image_reference)
    claim = work / "pvc-cast-models"
    claim.mkdir()

    base = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}."
    deployments = objects(docs, "Deployment")
    cast_pods = {name: Pod(f"{name}-0", base + str(i + 1), w) for i, (name, w) in enumerate(sorted(deployments.items()))}

    zone = ClusterDNS()
    for name, svc in objects(docs, "Service").items():
        zone.add(name, namespace, [p.address for p in cast_pods.values() if matches(svc["spec"]["selector"],
                                                                                     pod_labels(p.workload))])
    dns_server = DNSServer(zone, address="127.0.0.1", port=free_ports(1)[0], logger=DNSLogger(logf=lambda _: None))
    dns_server.start_thread()
    dns_address = f"127.0.0.1:{dns_server.server.server_address[1]}"
    service_addresses = {name: zone.records[name + "."][0] for name in objects(docs, "Service")
                         if zone.records[name + "."]}

    # The collector's pod: a sink on its address and OTLP gRPC port.
    sink = OtlpSink()
    collector = cast_pods.pop("otel-collector")
    sink_server = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=[sink])
    assert sink_server.add_insecure_port(f"{collector.address}:{container_port(collector.container, 'otlp-grpc')}")
    sink_server.start()

    outer = {"PATH": os.environ["PATH"]}  # the base image's
    image = {"/opt/venv": Path(sys.prefix)}
    running = Cluster(docs, namespace, cast_pods, dns_server, zone, sink)

    def folders_for(pod_name: str, workload: dict) -> dict[str, Path]:
        out = {}
        for volume in pod_spec(workload).get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] == "cast-models"
                out[volume["name"]] = claim
            elif volume["name"] == "cache":
                out[volume["name"]] = onnx_cache_dir  # per pod in a cluster; shared here to reuse the draft export
            elif "emptyDir" in volume:
                out[volume["name"]] = work / pod_name / volume["name"]
                out[volume["name"]].mkdir(parents=True)
            else:
                raise AssertionError(f"{pod_name}: a volume the test does not map: {volume}")
        return out

    def environment(pod: Pod, container: dict, paths: dict[str, Path]) -> dict[str, str]:
        fields = {"metadata.name": pod.name, "metadata.namespace": namespace, "status.podIP": pod.address}
        env = container_env(container, fields, base=image_env("runtime", outer))
        env = {k: translate(v, pod, dns_address, service_addresses, paths) for k, v in env.items()}
        return {**outer, **env}

    def command(container: dict, paths: dict[str, Path]) -> list[str]:
        argv = container.get("command") or image_entrypoint("runtime")
        argv = [map_paths(a, paths) for a in [*argv, *container.get("args", [])]]
        # This Python's path is the host's, not the container's: map the manifest's arguments only.
        return [*cast_console_script(), *argv[1:]] if argv[0] == "cast" else argv

    try:
        # The demo-models Job fills the claim from the demo image.
        [job] = objects(docs, "Job").values()
        seed = pod_spec(job)["containers"][0]
        paths = {**image, "/opt/cast/reference": image_reference, **volume_paths(job, seed, folders_for("seed", job))}
        seed_pod = Pod("cast-models-seed-0", base + "250", job)
        env = environment(seed_pod, seed, paths)
        run_to_completion(command(seed, paths), env, "the demo-models Job")

        for name, pod in cast_pods.items():
            folders = folders_for(pod.name, pod.workload)
            for init in pod_spec(pod.workload).get("initContainers", []):
                paths = {**image, **volume_paths(pod.workload, init, folders)}
                env = environment(pod, init, paths)
                run_to_completion(command(init, paths), env, f"{name}'s init container {init['name']}", 20)
            paths = {**image, **volume_paths(pod.workload, pod.container, folders)}
            pod.env = environment(pod, pod.container, paths)
            pod.log = work / f"{pod.name}.log"
            cwd = map_paths(image_workdir("runtime"), paths)
            with open(pod.log, "w") as log:
                pod.process = subprocess.Popen(command(pod.container, paths), env=pod.env, cwd=cwd, stdout=log,
                                               stderr=subprocess.STDOUT)
        for name, pod in cast_pods.items():
            wait_ready(pod)
        yield running
    finally:
        for pod in cast_pods.values():
            if pod.process is not None and pod.process.poll() is None:
                pod.process.terminate()
        for pod in cast_pods.values():
            if pod.process is not None:
                try:
                    pod.process.wait(10)
                except subprocess.TimeoutExpired:
                    pod.process.kill()
                    pod.process.wait()
        sink_server.stop(0)
        dns_server.stop()


def probe_ok(pod: Pod, probe: str) -> bool:
    spec = pod.container[probe]["grpc"]
    with grpc.insecure_channel(f"{pod.address}:{spec['port']}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=spec.get("service", "")), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_ready(pod: Pod) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not probe_ok(pod, "readinessProbe"):
        assert pod.process.poll() is None, f"{pod.name} exited with {pod.process.returncode}:\n{pod.log_tail()}"
        assert time.monotonic() < deadline, f"{pod.name} not ready after {READY_TIMEOUT_S} s:\n{pod.log_tail()}"
        time.sleep(0.3)
    for probe in ("startupProbe", "livenessProbe"):
        assert probe_ok(pod, probe), f"{pod.name}: its {probe} fails while it is ready"


def readme_request() -> dict:
    """The Generate request deploy/README.md sends."""
    import json

    readme = (DEPLOY / "README.md").read_text()
    match = re.search(r"-d '(\{[^']*\})'[^\n]*\n?[^\n]*cast\.v1\.GenerationService/Generate", readme)
    assert match, "deploy/README.md sends no Generate request"
    return json.loads(match[1])


def test_a_generate_call_through_the_orchestrators_service_answers(cluster):
    request = readme_request()
    address = cluster.service_address("cast-orchestrator", "grpc")
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        reply = stub.Generate(generation_pb2.GenerateRequest(**request), timeout=60)
        assert 1 <= reply.usage.completion_tokens <= request["max_new_tokens"]
        assert len(reply.token_ids) == reply.usage.completion_tokens
        assert reply.stats.steps >= 1
        # The orchestrator found the draft and verify pods through their headless Services' names.
        replicas = stub.ListReplicas(generation_pb2.ListReplicasRequest(), timeout=10).replicas
    seen = {(r.role, r.address, r.state) for r in replicas}
    port = {role: container_port(cluster.pods[f"cast-{role}"].container, "grpc") for role in ("draft", "verify")}
    assert seen == {(role, f"{cluster.pods[f'cast-{role}'].address}:{port[role]}", "serving")
                    for role in ("draft", "verify")}


telemetry = pytest.mark.skipif(importlib.util.find_spec("cast_runtime.telemetry") is None,
                               reason="the services export no telemetry yet (issue 20)")


@telemetry
def test_the_autoscalers_series_are_served(cluster):
    """After a drafted Generate, each pod's scrape endpoint (its prometheus.io/port) serves the series the
    Prometheus Adapter's rules read."""
    address = cluster.service_address("cast-orchestrator", "grpc")
    with grpc.insecure_channel(address) as channel:
        generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            generation_pb2.GenerateRequest(prompt="def f(x):", max_new_tokens=24, policy="eagle2"), timeout=60)
    wanted = {"cast-verify": ["cast_verify_batch_occupancy"],
              "cast-draft": ['cast_forward_duration_seconds_sum{cast_forward_kind="expand"'],
              "cast-orchestrator": ["cast_orchestrator_queued_requests"]}
    for name, series in wanted.items():
        pod = cluster.pods[name]
        annotations = pod.workload["spec"]["template"]["metadata"]["annotations"]
        url = f"http://{pod.address}:{annotations['prometheus.io/port']}{annotations['prometheus.io/path']}"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        for s in series:
            assert re.search(rf"^{re.escape(s)}", text, re.M), f"{name} serves no {s} at {url}"


@telemetry
def test_a_generate_call_leaves_a_trace_at_the_collector(cluster):
    address = cluster.service_address("cast-orchestrator", "grpc")
    with grpc.insecure_channel(address) as channel:
        generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            generation_pb2.GenerateRequest(prompt="import os\n", max_new_tokens=8), timeout=60)
    deadline = time.monotonic() + 20  # the batch span processor's delay is 5 s
    wanted = {pod.env["OTEL_SERVICE_NAME"].encode(): pod.name.encode() for pod in cluster.pods.values()}
    while True:
        traces = [body for method, body in list(cluster.sink.calls) if method.endswith("TraceService/Export")]
        missing = [s for s, pod in wanted.items() if not any(s in body and pod in body for body in traces)]
        if not missing:
            break
        assert time.monotonic() < deadline, f"no spans at the collector from {missing}"
        time.sleep(0.5)
