"""Where a service's domain calls run: one at a time, on its worker thread or, for a step, on the event loop.

A service's domain object (the draft's Expander, the Verifier) is not thread-safe; a lock lets one thread at a time
in. Long or housekeeping calls (a prefill, release, expiry) go to the worker thread, so the event loop stays free
for health checks and Describe. With `steps_on_loop`, a step's call (Expand, Verify) runs on the event loop itself
whenever no other call holds the lock: the hop to the worker and back costs two thread wake-ups, 0.3-0.4 ms a call
on a 2-core CPU (reports/rpc_latency.md), and a step is short, so health checks and Describe wait at most one
step's forward. The services turn it on with CUDA only: on the 2-core CPU the torch verifier's forward ran slower
on the loop's thread, which cost more than the hops.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class DomainWorker:
    def __init__(self, executor: ThreadPoolExecutor, steps_on_loop: bool = False) -> None:
        self.executor = executor  # one thread
        self.steps_on_loop = steps_on_loop
        self.lock = threading.Lock()  # held by whichever thread is inside a domain call

    async def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the worker thread, once no other domain call runs."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._locked, fn, args)

    async def run_step(self, fn: Callable[..., T], *args) -> T:
        """With steps_on_loop, fn(*args) on this (the event loop's) thread if no other domain call runs; else on the
        worker thread."""
        if not self.steps_on_loop or not self.lock.acquire(blocking=False):
            return await self.run(fn, *args)
        try:
            return fn(*args)
        finally:
            self.lock.release()

    def _locked(self, fn: Callable[..., T], args: tuple) -> T:
        with self.lock:
            return fn(*args)
