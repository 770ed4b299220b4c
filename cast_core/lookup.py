"""Prompt lookup (the `lookup` draft level): the tokens that followed the latest earlier occurrence of the
sequence's recent suffix, in the prompt or in what was generated since. Almost free, and right wherever the output
repeats its input (code edits, quotes, lists); transformers' `prompt_lookup_num_tokens` does the same search. The
draft service drafts with it; the orchestrator's cascade asks whether a sequence is copying (`match_run`).
"""

from __future__ import annotations

import numpy as np

MAX_NGRAM = 3  # the longest suffix matched first; shorter ones are tried when it has no earlier occurrence
MIN_NGRAM = 1


def lookup_chain(tokens: np.ndarray, max_length: int, max_ngram: int = MAX_NGRAM,
                 min_ngram: int = MIN_NGRAM) -> np.ndarray:
    """tokens [n] int64, the sequence so far (its last token is the tree's root). Returns [<= max_length] int64:
    the continuation of the latest earlier occurrence of the longest matching suffix (max_ngram down to
    min_ngram tokens); empty when nothing matches."""
    start = continuation_start(tokens, max_ngram, min_ngram) if max_length > 0 else None
    return tokens[:0] if start is None else tokens[start: start + max_length]


def continuation_start(tokens: np.ndarray, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> int | None:
    """Where lookup's chain starts in `tokens` [n]: just after the latest earlier occurrence of the longest suffix
    of max_ngram down to min_ngram tokens (None: no earlier occurrence). One pass over the history finds where an
    earlier copy of the last token ends; longer suffixes only check those places (a step of a batch of 32 long
    histories pays this per sequence, in the draft service and in the orchestrator)."""
    n = tokens.shape[0]
    ends = np.flatnonzero(tokens[: n - 1] == tokens[n - 1])  # [hits] where an earlier copy of the suffix ends
    by_size = []  # [size - 1]: the ends of earlier copies of the last `size` tokens
    for size in range(1, min(max_ngram, n - 1) + 1):
        if size > 1:
            ends = ends[ends >= size - 1]
            ends = ends[tokens[ends - (size - 1)] == tokens[n - size]]
        by_size.append(ends)
    for size in range(len(by_size), min_ngram - 1, -1):
        if by_size[size - 1].size:
            return int(by_size[size - 1][-1]) + 1
    return None


def match_run(tokens: np.ndarray, limit: int) -> int:
    """How many of the last tokens (up to `limit`) equal those before lookup's chain: a fresh one- to three-token
    match scores its size, text being copied more. With the reference target's greedy outputs, lookup's chains of
    8 had 0-3.4 tokens accepted below a run of 4 and 6-7 from 4 up (benchmarks/lookup_signal.py)."""
    start = continuation_start(tokens)
    if start is None:
        return 0
    n, run = tokens.shape[0], 0
    while run < limit and run < start and tokens[start - 1 - run] == tokens[n - 1 - run]:
        run += 1
    return run


def chain_values(length: int, acceptance: list[float]) -> np.ndarray:
    """[length] float32: node d's value, the product of acceptance[0..d] (the last entry repeats past the list),
    each entry clipped to [0, 1] so that a child's value never exceeds its parent's."""
    if length == 0:
        return np.zeros(0, dtype=np.float32)
    rates = np.asarray([acceptance[min(d, len(acceptance) - 1)] for d in range(length)], dtype=np.float64)
    return np.cumprod(np.clip(rates, 0.0, 1.0)).astype(np.float32)
