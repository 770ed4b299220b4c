"""`cast generate` against a running stack: the prompt from standard input, --stream --json as JSON lines, --stats."""

from __future__ import annotations

import io
import json
import re

from cast.v1 import generation_pb2
from orchestrator.cli import cmd_generate

PROMPT = "def fibonacci(n):"


def generate(capsys, monkeypatch, *args: str, stdin: str = "") -> tuple[str, str]:
    """(stdout, stderr) of `cast generate ARGS`, which must succeed."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert cmd_generate(list(args)) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_stream_json_prints_one_object_per_chunk(tiny_stack, generation_stub, capsys, monkeypatch):
    unary = generation_stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=24, policy="eagle2",
                                                                    ignore_eos=True))
    out, _ = generate(capsys, monkeypatch, "--addr", tiny_stack.spec.address, "--stream", "--json", "--policy",
                      "eagle2", "--max-new-tokens", "24", "--ignore-eos", PROMPT)
    chunks = [json.loads(line) for line in out.splitlines()]
    assert len(chunks) > 1  # streamed: a chunk per step, not one response
    assert [t for c in chunks for t in c.get("token_ids", [])] == list(unary.token_ids)
    assert "".join(c.get("text", "") for c in chunks) == unary.text
    last = chunks[-1]
    assert last["finish_reason"] == "FINISH_REASON_LENGTH" and last["usage"]["completion_tokens"] == 24
    assert len(last["stats"]["step_stats"]) == last["stats"]["steps"] == len(chunks)
    # the cost model's prediction of every step (JSON leaves out zeros): its Verify, and its Expand where it drafted
    steps = last["stats"]["step_stats"]
    assert all(s.get("predicted_verify_ms", 0) > 0 for s in steps), steps
    assert all(s.get("predicted_draft_ms", 0) > 0 for s in steps if s.get("expanded_nodes", 0) > 1), steps
    assert any(s.get("expanded_nodes", 0) > 1 for s in steps)
    assert all("finish_reason" not in c for c in chunks[:-1])


def test_the_prompt_comes_from_stdin_with_a_dash(tiny_stack, capsys, monkeypatch):
    args = ("--addr", tiny_stack.spec.address, "--max-new-tokens", "12", "--policy", "eagle2")
    from_argument, _ = generate(capsys, monkeypatch, *args, "import os\n")
    from_stdin, _ = generate(capsys, monkeypatch, *args, "-", stdin="import os\n")
    assert from_stdin == from_argument and from_stdin.strip()
    other, _ = generate(capsys, monkeypatch, *args, "-", stdin="class Stack:")
    assert other != from_stdin  # the prompt really came from stdin


def test_stats_go_to_stderr_after_a_plain_run(tiny_stack, capsys, monkeypatch):
    args = ("--addr", tiny_stack.spec.address, "--max-new-tokens", "20", "--ignore-eos", "--policy", "eagle2")
    plain, quiet = generate(capsys, monkeypatch, *args, PROMPT)
    out, err = generate(capsys, monkeypatch, *args, "--stats", PROMPT)
    assert out == plain and quiet == ""  # stdout is the text alone, with or without --stats
    match = re.fullmatch(r"20 tokens in ([\d.]+) s: ([\d.]+) tokens/s, ([\d.]+) tokens/step \((\d+) steps, policy eagle2\)\n",
                         err)
    assert match, err
    seconds, rate, per_step, steps = float(match[1]), float(match[2]), float(match[3]), int(match[4])
    # seconds are printed to 0.01 (a fast run's 0.08 s is 0.0845 s: 6 % off), the rate to 0.1: compare within both.
    assert per_step == round(20 / steps, 2) and abs(20 / rate - seconds) <= 0.005 + 20 * 0.05 / rate**2 + 1e-9
    _, streamed = generate(capsys, monkeypatch, *args, "--stats", "--stream", PROMPT)
    assert re.fullmatch(r"20 tokens in [\d.]+ s: [\d.]+ tokens/s, [\d.]+ tokens/step \(\d+ steps, policy eagle2\)\n",
                        streamed)
