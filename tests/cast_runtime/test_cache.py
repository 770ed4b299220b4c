"""The start-up lock: services sharing a cache directory start up one at a time (their cost tables are profiled on a
quiet host). Another process holds the lock, as another service's start-up would."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest

from cast_runtime.cache import startup_lock

log = logging.getLogger("test")

HOLDER = """
import logging, sys, time
from pathlib import Path
from cast_runtime.cache import startup_lock
with startup_lock(Path(sys.argv[1]), logging.getLogger("holder"), "holder"):
    Path(sys.argv[2]).write_text("holding")
    time.sleep(float(sys.argv[3]))
    Path(sys.argv[2]).write_text("done")
"""


def hold(cache_dir, marker, seconds: float) -> subprocess.Popen:
    """Another process's start-up holding the lock for `seconds` (returns once it holds it)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(cache_dir), str(marker), str(seconds)])
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert holder.poll() is None and time.monotonic() < deadline, "the holder did not take the lock"
        time.sleep(0.02)
    return holder


def test_a_start_up_waits_for_the_one_running_in_the_same_cache_dir(tmp_path, caplog):
    marker = tmp_path / "marker"
    holder = hold(tmp_path, marker, 1.0)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="test"), startup_lock(tmp_path, log, "mine"):
            waited = time.monotonic() - started
            assert marker.read_text() == "done"  # the other start-up had finished before this one began
        assert waited >= 0.5
        assert "mine: waited" in caplog.text and "mine: start-up done" in caplog.text
    finally:
        holder.kill()
        holder.wait()


def test_start_ups_in_other_cache_dirs_do_not_wait(tmp_path):
    marker = tmp_path / "marker"
    holder = hold(tmp_path / "theirs", marker, 30.0)
    try:
        started = time.monotonic()
        with startup_lock(tmp_path / "mine", log, "mine"):
            assert time.monotonic() - started < 0.5
    finally:
        holder.kill()
        holder.wait()


def test_a_start_up_stuck_holding_the_lock_is_not_waited_for_past_the_limit(tmp_path, caplog):
    marker = tmp_path / "marker"
    holder = hold(tmp_path, marker, 30.0)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="test"), startup_lock(tmp_path, log, "mine", wait_s=0.3):
            assert 0.3 <= time.monotonic() - started < 5
            assert marker.read_text() == "holding"  # it still holds the lock
        assert "still starting up" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    with startup_lock(tmp_path, log, "after"):  # the lock dies with its holder
        pass


def test_the_lock_is_released_when_the_start_up_fails(tmp_path):
    with pytest.raises(RuntimeError), startup_lock(tmp_path, log, "failing"):
        raise RuntimeError("export failed")
    marker = tmp_path / "marker"
    holder = hold(tmp_path, marker, 0.0)  # takes it at once
    holder.wait(timeout=30)
    assert marker.read_text() == "done"
