"""The draft's resident memory after start-up: serving batches up to --max-batch, prompts included, adds nothing;
the bucket sessions hold one copy of the weights between them."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from cast_runtime.sessions import SessionStore
from draft_service.expansion import Budget, Expander, SequenceInput
from draft_service.runner import TOKEN_BUCKETS, DraftRunner


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def trimmed_resident_mib() -> float:
    """Resident memory after glibc has given its free heap back: a session's start parses the whole model file and
    frees it, and glibc keeps much of that freed memory resident otherwise."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pytest.skip("needs glibc's malloc_trim")
    return resident_mib()


def test_bucket_sessions_hold_one_copy_of_the_weights_between_them(wide_exported):
    """Six more (batch, tokens) sessions, each run once, add less than two copies of the weights to resident memory.
    Sessions loading their own (as before the runner shared them) added 140 MiB here for 20 MiB of weights; sessions
    on the runner's one copy, 20 MiB (their own structures and working memory)."""
    runner = DraftRunner(*wide_exported, provider="cpu", fixed_buffers=True, capacity=80)
    weights = sum(value.tensor_size_in_bytes() for value in runner.weights.values()) / 2**20
    assert weights > 19, "the MatMul weights and the embedding are shared"
    runner.run(runner.padding_rows(1, 1))  # the KV buffers and the first bucket session
    before = trimmed_resident_mib()
    for tokens in TOKEN_BUCKETS[1:]:
        runner.run(runner.padding_rows(1, tokens))
    assert len(runner.buckets) == 7
    grown = trimmed_resident_mib() - before
    assert grown < 2 * weights, f"6 sessions on {weights:.0f} MiB of weights grew resident memory by {grown:.0f} MiB"


def test_resident_memory_stays_flat_across_batches_and_prompts_after_warm_up(exported):
    """Batches of 1, 4 and 8 sequences with prompts of 100 and 900 tokens, then a tree each, three rounds: after
    warm_memory (what the server runs at start-up) the first round adds little (Python's own heap) and the next
    two nothing that counts. Without the bounds, ONNX Runtime's arena grew by the largest forward and the KV
    buffers by every new batch size and width: over 700 MiB in the first round here."""
    runner = DraftRunner(*exported, provider="cpu", max_batch=8)
    runner.warm_memory()
    expander = Expander(runner, SessionStore(64, 60.0), runner.meta.max_context)
    rng = np.random.default_rng(0)
    budget = Budget(top_k=4, max_depth=4, max_breadth=4)
    resident, n = [resident_mib()], 0
    for _ in range(3):
        for batch in (1, 4, 8):
            for prompt in (100, 900):
                ids = [f"s{n}_{b}" for b in range(batch)]
                n += 1
                expander.expand([SequenceInput(s, rng.integers(1, 400, prompt), 0) for s in ids], budget)
                expander.expand([SequenceInput(s, np.array([5, 6]), prompt) for s in ids], budget)
                expander.release(ids)
        resident.append(resident_mib())
    first, again = resident[1] - resident[0], resident[3] - resident[1]
    assert first < 32, f"the first round after warm-up grew resident memory by {first:.1f} MiB"
    assert again < 8, f"two more rounds of the same batches grew resident memory by {again:.1f} MiB"
