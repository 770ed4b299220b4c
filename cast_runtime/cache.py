"""The one cache directory of a machine: ONNX exports, cost tables and the tiny random pair live under it; and the
lock that lets the services sharing it start up one at a time."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STARTUP_LOCK = "startup.lock"
STARTUP_WAIT_S = 300.0  # a start-up still holding the lock after this long is not waited for


def default_cache_dir() -> Path:
    """$CAST_CACHE_DIR when set and not empty, else ~/.cache/cast-serve."""
    return Path(os.environ.get("CAST_CACHE_DIR") or Path.home() / ".cache" / "cast-serve")


@contextmanager
def startup_lock(cache_dir: Path | None, log: logging.Logger, what: str,
                 wait_s: float = STARTUP_WAIT_S) -> Iterator[None]:
    """Held while a service starts up (loads, exports, warms up and profiles `what`): the services that share a cache
    directory on a host start one at a time. A start-up is seconds to minutes of full load on the host's cores, and
    a cost table profiled beside another service's start-up is priced for that load and cached for good (`cast up`
    on a 2-core VM, both services starting at once: the verifier's one-token step profiled at 15.0 ms, 5.2 ms alone;
    CAST then priced every tree against a verifier 2-3x dearer than it is). After `wait_s` of waiting, a service
    starts anyway, and says so."""
    path = Path(cache_dir or default_cache_dir()) / STARTUP_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        started, held = time.monotonic(), False
        while not held:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                if time.monotonic() - started >= wait_s:
                    log.warning("%s: another service on this host is still starting up after %.0f s; starting "
                                "anyway (a cost table profiled now may be priced for its load)", what, wait_s)
                    break
                time.sleep(0.1)
        began = time.monotonic()
        if held and began - started >= 0.1:
            log.info("%s: waited %.1f s for another service's start-up on this host", what, began - started)
        log.info("%s: start-up began", what)
        try:
            yield
        finally:
            log.info("%s: start-up done in %.1f s", what, time.monotonic() - began)
            if held:
                fcntl.flock(lock, fcntl.LOCK_UN)
