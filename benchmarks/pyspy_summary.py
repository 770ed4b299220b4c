"""Where a process's threads spend their samples, from `py-spy record -f raw` output.

Each line of the raw format is one distinct stack, frames outermost first and separated by ';', then its sample
count. Threads are told apart by their outermost frames: the event loop (`run_forever`), the model's worker thread
(`concurrent/futures/thread.py`), or other. A sample counts for every function on its stack once (inclusive), so a
row is "samples with this function running or below". Idle samples (py-spy drops them unless --idle) are absent:
divide by the rate and the steps to get time per step.

    python -m benchmarks.pyspy_summary pyspy_draft_service_c1.txt --steps 2400 --rate 500 --top 30
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path


def thread_kind(frames: list[str]) -> str:
    if any("run_forever" in f for f in frames):
        return "event loop"
    if any("concurrent/futures/thread.py" in f for f in frames):
        return "worker"
    return "other"


def function_name(frame: str) -> str:
    """'name (path/file.py:123)' -> 'name (path/file.py)': one row per function, not per line."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summarize(lines: list[str]) -> dict[str, tuple[int, Counter]]:
    """Per thread kind: its samples and, per function, the samples with it on the stack."""
    totals: dict[str, int] = defaultdict(int)
    inclusive: dict[str, Counter] = defaultdict(Counter)
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        kind = thread_kind(frames)
        totals[kind] += int(count)
        for name in {function_name(f) for f in frames}:
            inclusive[kind][name] += int(count)
    return {kind: (totals[kind], inclusive[kind]) for kind in totals}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("raw", type=Path)
    p.add_argument("--rate", type=float, default=500.0, help="py-spy's samples per second")
    p.add_argument("--steps", type=float, default=0.0, help="decoding steps in the recorded window: adds ms per step")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    for kind, (total, counts) in sorted(summarize(a.raw.read_text().splitlines()).items()):
        per_step = f", {1e3 * total / a.rate / a.steps:.3f} ms a step" if a.steps else ""
        print(f"== {kind}: {total} samples{per_step}")
        # Frames on every sample of the thread (its start-up and loop) say nothing: left out.
        for name, n in [(name, n) for name, n in counts.most_common() if n < total][: a.top]:
            ms = f" {1e3 * n / a.rate / a.steps:7.3f} ms" if a.steps else ""
            print(f"{n:7d}{ms}  {name}")


if __name__ == "__main__":
    main()
