"""Keep CPUs from going idle: one busy loop per CPU in the lowest scheduling class (SCHED_IDLE).

Why: a decoding step hands a message between processes several times (orchestrator, draft, verifier, and the
threads inside each), and every process sleeps while another works. On a VM whose guest has no cpuidle driver
(the GPU machines here) an idle vCPU halts to the host, so each hand-off waits for the host to wake a vCPU and then
runs on cold caches: a gRPC round trip inside a step costs ~3x its back-to-back time (reports/rpc-latency/, run
P). A SCHED_IDLE task runs only when nothing else wants the CPU and is preempted as soon as any other thread wakes,
so the CPU never halts and the services lose no CPU time. The cost: those CPUs draw full power and show 100 % busy,
so name only the CPUs the services run on where that matters (`--cpus 0-7`).

    python -m orchestrator.keep_awake --cpus all      # until killed; also `cast up --keep-cpus-awake all`
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

CHECK_EVERY = 200_000  # loop turns between checks that the owner is still alive (~5 ms of spinning)


def parse_cpus(spec: str) -> list[int]:
    """'all' (the CPUs this process may run on), or a list like '0-3,8'. Raises ValueError naming the bad part."""
    allowed = sorted(os.sched_getaffinity(0))
    if spec.strip() == "all":
        return allowed
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise ValueError(f"cpus: {part!r} is not a CPU number or range (e.g. 0-3,8)") from None
    outside = sorted(cpus - set(allowed))
    if not cpus or outside:
        raise ValueError(f"cpus: {spec!r} names CPUs this process may not use: {outside} (allowed: {allowed})")
    return sorted(cpus)


def spin(cpu: int, owner: int) -> None:
    """This process's whole life: run on `cpu` only when nothing else does, until `owner` exits."""
    os.sched_setaffinity(0, {cpu})
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # lowering one's own class needs no privilege
    while os.getppid() == owner:
        for _ in range(CHECK_EVERY):
            pass


class KeepAwake:
    """Spinner processes, one per CPU, children of this process; they exit on stop() or when this process dies."""

    def __init__(self, cpus: list[int]) -> None:
        self.cpus = cpus
        self.processes: list[subprocess.Popen] = []

    def start(self) -> KeepAwake:
        owner = os.getpid()
        for cpu in self.cpus:
            self.processes.append(subprocess.Popen(
                [sys.executable, "-c", f"from orchestrator.keep_awake import spin; spin({cpu}, {owner})"],
                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}))
        return self

    def stop(self) -> None:
        for p in self.processes:
            p.terminate()
        for p in self.processes:
            p.wait(timeout=10)
        self.processes.clear()

    def __enter__(self) -> KeepAwake:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", default="all", help="'all' or a list like 0-3,8 (default: all)")
    a = parser.parse_args(argv)
    try:
        cpus = parse_cpus(a.cpus)
    except ValueError as e:
        parser.error(str(e))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with KeepAwake(cpus):
        print(f"keeping CPUs {cpus} awake (SCHED_IDLE spinners); Ctrl-C or SIGTERM stops", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
