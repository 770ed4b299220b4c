"""Helpers to run the three services as separate processes on loopback for a test module."""

from __future__ import annotations

from pathlib import Path

from orchestrator.stack import Stack, StackSpec, free_ports


def start_stack(target: Path, draft: Path | None, log_dir: Path, verify_dtype: str = "float64",
                draft_levels: tuple[str, ...] = ("sparse,layers=1", "lookup"), **kw) -> Stack:
    """The draft service serves the draft (None: none), the target with one layer (sparse) and lookup."""
    port, draft_port, verify_port, http_port = free_ports(4)
    spec = StackSpec(target, draft, port=port, draft_port=draft_port, verify_port=verify_port,
                     verify_dtype=verify_dtype, log_dir=log_dir, http_port=http_port, draft_levels=draft_levels, **kw)
    stack = Stack(spec).start()
    try:
        stack.wait_ready(timeout_s=600)
    except BaseException:
        stack.stop()
        raise
    return stack


def prompts_for_tests(count: int = 20) -> list[str]:
    """Prompts of varied length: code and prose, from one character to a few hundred."""
    import sysconfig

    source = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    out = ["d", "def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):", "# sort a list\n"]
    step = 97
    for i in range(count - len(out)):
        start = (i * 331) % (len(source) - 800)
        out.append(source[start: start + 5 + step * (i % 8)])
    return out[:count]
