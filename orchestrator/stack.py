"""A local stack: the draft, verify and orchestrator services as three processes on loopback (`cast up`)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cast_runtime.cache import default_cache_dir
from cast_runtime.tls import channel_credentials
from orchestrator.keep_awake import KeepAwake

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PAIR = REPO_ROOT / "models" / "reference"


def default_pair() -> tuple[Path, Path]:
    """The project's reference pair when present, else a tiny random pair made once on first start."""
    if (REFERENCE_PAIR / "target" / "config.json").exists():
        return REFERENCE_PAIR / "target", REFERENCE_PAIR / "draft"
    from cast_models.tiny import make_tiny_pair

    return make_tiny_pair(default_cache_dir() / "tiny-pair")


@dataclass
class StackSpec:
    target_dir: Path
    draft_dir: Path | None  # None: no small draft; the draft service drafts with the target's own levels
    host: str = "127.0.0.1"
    port: int = 50051
    draft_port: int = 50052
    verify_port: int = 50053
    verify_dtype: str = "auto"
    draft_args: list[str] = field(default_factory=list)
    verify_args: list[str] = field(default_factory=list)
    orchestrator_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None  # None: the services log to this process's stderr
    keep_cpus_awake: list[int] = field(default_factory=list)  # SCHED_IDLE spinners on these CPUs (keep_awake.py)
    draft_replicas: int = 1      # replica i listens on draft_port + 2 i (beside verify replica i on verify_port + 2 i)
    verify_replicas: int = 1
    http_port: int | None = None  # the orchestrator's OpenAI-compatible HTTP API; None: off
    # Served beside the draft (draft_service/levels.py): "sparse" (of the target; "sparse,layers=N" to choose the
    # layer count; "sparse=DIR" a checkpoint draft_service.sparse wrote) and "lookup".
    draft_levels: tuple[str, ...] = ("sparse", "lookup")
    metrics_port: int | None = None  # Prometheus endpoints: the orchestrator's; draft replica i's at metrics_port + 1
                                     # + 2 i, verify replica i's at metrics_port + 2 + 2 i. None: off
    env: dict[str, str] = field(default_factory=dict)  # for every service, over this process's (OTEL_*, ...)
    tls_cert: Path | None = None  # every service serves TLS with this certificate (its names cover `host`)
    tls_key: Path | None = None
    tls_ca: Path | None = None    # the CA that signed it: what the orchestrator (and wait_ready) trust
    mtls: bool = False            # the replicas require a client certificate signed by tls_ca; the orchestrator
                                  # shows tls_cert
    auth_tokens: Path | None = None  # the orchestrator's token file (auth.py)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """What a client of the stack's services (the orchestrator, health checks) connects with; None: plaintext."""
        if self.tls_ca is None:
            return None
        return channel_credentials(self.tls_ca, *((self.tls_cert, self.tls_key) if self.mtls else ()))

    def tls_args(self, role: str) -> list[str]:
        if self.tls_cert is None:
            return []
        args = ["--tls-cert", str(self.tls_cert), "--tls-key", str(self.tls_key)]
        if role != "orchestrator":
            return args + (["--tls-client-ca", str(self.tls_ca)] if self.mtls else [])
        args += ["--tls-ca", str(self.tls_ca)] if self.tls_ca else []
        args += ["--tls-client-cert", str(self.tls_cert), "--tls-client-key", str(self.tls_key)] if self.mtls else []
        return args + (["--auth-tokens", str(self.auth_tokens)] if self.auth_tokens else [])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_url(self) -> str | None:
        return f"http://{self.host}:{self.http_port}" if self.http_port is not None else None

    def replica_addresses(self, role: str) -> dict[str, str]:
        """{process name: address} of the draft or verify replicas: "draft", "draft-2", ..."""
        count, first = (self.draft_replicas, self.draft_port) if role == "draft" else (self.verify_replicas, self.verify_port)
        return {role if i == 0 else f"{role}-{i + 1}": f"{self.host}:{first + 2 * i}" for i in range(count)}

    def metrics_ports(self) -> dict[str, int]:
        """{process name: its Prometheus port}, where metrics are on."""
        if self.metrics_port is None:
            return {}
        out = {"orchestrator": self.metrics_port}
        for role, first in (("draft", 1), ("verify", 2)):
            for i, name in enumerate(self.replica_addresses(role)):
                out[name] = self.metrics_port + first + 2 * i
        return out

    def commands(self) -> dict[str, list[str]]:
        py = sys.executable
        metrics = {name: ["--metrics-port", str(port)] for name, port in self.metrics_ports().items()}
        out = {}
        for name, address in self.replica_addresses("draft").items():
            out[name] = [py, "-m", "draft_service.server", *self.level_args(), "--host", self.host,
                         "--port", address.rpartition(":")[2], *metrics.get(name, []), *self.tls_args("draft"),
                         *self.draft_args]
        for name, address in self.replica_addresses("verify").items():
            out[name] = [py, "-m", "verify_service.server", "--model", str(self.target_dir), "--host", self.host,
                         "--port", address.rpartition(":")[2], "--dtype", self.verify_dtype, *metrics.get(name, []),
                         *self.tls_args("verify"), *self.verify_args]
        out["orchestrator"] = [
            py, "-m", "orchestrator.server", "--tokenizer", str(self.target_dir), "--host", self.host,
            "--port", str(self.port), "--draft", ",".join(self.replica_addresses("draft").values()),
            "--verify", ",".join(self.replica_addresses("verify").values()),
            *(["--http-port", str(self.http_port)] if self.http_port is not None else []),
            *metrics.get("orchestrator", []), *self.tls_args("orchestrator"), *self.orchestrator_args]
        return out

    def level_args(self) -> list[str]:
        """The draft service's levels: the draft model as `small` (--model), then sparse (of the target), lookup."""
        args = ["--model", str(self.draft_dir)] if self.draft_dir is not None else []
        for level in self.draft_levels:
            name, _, options = level.partition(",")
            if name == "sparse":
                level = f"sparse={self.target_dir}" + (f",{options}" if options else "")
            args += ["--draft-level", level]
        return args


def free_ports(n: int) -> list[int]:
    """n loopback ports free right now (for tests and benchmarks that start several services), each the first of 16
    free-to-use ports (replica i's at +2 i). They lie below the kernel's ephemeral range: a port from there is never
    handed to an outgoing connection or a bind to port 0, so it stays free until its service binds it, which can be
    a minute later (services sharing a cache start one at a time)."""
    top = ephemeral_ports_start() // 16
    ports, socks = [], []
    try:
        while len(ports) < n:
            port = 16 * random.randrange(max(top - 1000, 64), top)
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def ephemeral_ports_start() -> int:
    """The first port of the range the kernel hands out to outgoing connections (Linux; else the IANA range's)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def is_serving(address: str, timeout: float = 1.0, credentials: grpc.ChannelCredentials | None = None) -> bool:
    with (grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class Stack:
    """Starts the three services; `wait_ready` returns once all three answer health checks as SERVING."""

    def __init__(self, spec: StackSpec) -> None:
        self.spec = spec
        self.processes: dict[str, subprocess.Popen] = {}
        self._logs = []
        self.keep_awake = KeepAwake(spec.keep_cpus_awake)

    def start(self) -> Stack:
        self.keep_awake.start()
        for name in self.spec.commands():
            self.launch(name)
        return self

    def launch(self, name: str) -> None:
        """Start (or start again, after it exited) one of the stack's processes; its log is appended to."""
        out = None
        if self.spec.log_dir is not None:
            self.spec.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.spec.log_dir / f"{name}.log", "a")
            self._logs.append(out)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.spec.env}
        self.processes[name] = subprocess.Popen(self.spec.commands()[name], env=env, stdout=out,
                                                stderr=subprocess.STDOUT if out else None)

    def addresses(self) -> dict[str, str]:
        s = self.spec
        return {**s.replica_addresses("draft"), **s.replica_addresses("verify"), "orchestrator": s.address}

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = dict(self.addresses())
        credentials = self.spec.credentials()
        while pending:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"the {name} service exited with code {proc.returncode}{self._log_hint(name)}")
            for name, address in list(pending.items()):
                if is_serving(address, credentials=credentials):
                    del pending[name]
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s:.0f} s: {', '.join(pending)}")
            if pending:
                time.sleep(0.3)

    def _log_hint(self, name: str) -> str:
        if self.spec.log_dir is None:
            return ""
        log = (self.spec.log_dir / f"{name}.log").read_text()[-3000:]
        return f"; its log ends:\n{log}"

    def first_exit(self) -> str | None:
        return next((n for n, p in self.processes.items() if p.poll() is not None), None)

    def stop(self, grace_s: float = 10.0) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in self.processes.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._logs:
            f.close()
        self.keep_awake.stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
