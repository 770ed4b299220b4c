"""The SCHED_IDLE spinners that keep CPUs from halting between a step's messages."""

import os
import subprocess
import sys
import time

import pytest

from orchestrator.keep_awake import KeepAwake, parse_cpus

FIRST_CPU = min(os.sched_getaffinity(0))


def test_parse_cpus_all_is_this_process_affinity():
    assert parse_cpus("all") == sorted(os.sched_getaffinity(0))


def test_parse_cpus_lists_and_ranges():
    assert parse_cpus(f"{FIRST_CPU}") == [FIRST_CPU]
    assert parse_cpus(f"{FIRST_CPU}-{FIRST_CPU},{FIRST_CPU}") == [FIRST_CPU]


@pytest.mark.parametrize("spec", ["x", "1-y", "", "99999"])
def test_parse_cpus_rejects_bad_specs_naming_the_flag(spec):
    with pytest.raises(ValueError, match="cpus"):
        parse_cpus(spec)


def state(pid: int) -> str:
    """A process's state letter ('R', 'S', 'Z', ...), or 'gone'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def wait_until_ended(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if state(pid) in ("Z", "X", "gone"):
            return True
        time.sleep(0.05)
    return False


def test_spinners_run_idle_class_on_their_cpu_and_stop():
    with KeepAwake([FIRST_CPU]) as spinners:
        (proc,) = spinners.processes
        deadline = time.monotonic() + 10
        while os.sched_getscheduler(proc.pid) != os.SCHED_IDLE and time.monotonic() < deadline:
            time.sleep(0.05)  # the child sets its class right after start-up
        assert os.sched_getscheduler(proc.pid) == os.SCHED_IDLE
        assert os.sched_getaffinity(proc.pid) == {FIRST_CPU}
        assert proc.poll() is None
    assert proc.returncode is not None


def test_spinners_exit_when_their_owner_is_killed():
    owner = subprocess.Popen(
        [sys.executable, "-c", f"from orchestrator.keep_awake import KeepAwake; import time; "
                               f"k = KeepAwake([{FIRST_CPU}]).start(); print(k.processes[0].pid, flush=True); "
                               f"time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    spinner = int(owner.stdout.readline())
    assert state(spinner) not in ("Z", "X", "gone")
    owner.kill()
    owner.wait()
    assert wait_until_ended(spinner), "a spinner outlived the process that started it"
