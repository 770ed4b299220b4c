"""DomainWorker: one domain call at a time; a step runs on the event loop's thread unless another call runs."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cast_core.worker import DomainWorker


def thread_name() -> str:
    return threading.current_thread().name


async def test_a_step_runs_on_the_loop_when_idle_and_waits_its_turn_on_the_worker_otherwise():
    worker = DomainWorker(ThreadPoolExecutor(max_workers=1, thread_name_prefix="domain"), steps_on_loop=True)
    loop_thread = thread_name()
    assert await worker.run_step(thread_name) == loop_thread
    assert (await worker.run(thread_name)).startswith("domain")

    busy = asyncio.ensure_future(worker.run(time.sleep, 0.2))  # a long call holds the domain
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    assert (await worker.run_step(thread_name)).startswith("domain")  # queued behind it, not beside it
    assert time.perf_counter() - started > 0.1
    await busy
    assert not worker.lock.locked()
    worker.executor.shutdown()


async def test_without_steps_on_loop_every_call_runs_on_the_worker():
    worker = DomainWorker(ThreadPoolExecutor(max_workers=1, thread_name_prefix="domain"))
    assert (await worker.run_step(thread_name)).startswith("domain")
    worker.executor.shutdown()


async def test_a_failing_step_frees_the_domain():
    worker = DomainWorker(ThreadPoolExecutor(max_workers=1), steps_on_loop=True)

    def fail():
        raise ValueError("bad request")

    for run in (worker.run_step, worker.run):
        with pytest.raises(ValueError):
            await run(fail)
        assert not worker.lock.locked()
    worker.executor.shutdown()
