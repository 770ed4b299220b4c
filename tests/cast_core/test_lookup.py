"""Prompt lookup's match, as the orchestrator's cascade reads it: is the sequence copying text it has seen?"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cast_core.lookup import continuation_start, lookup_chain, match_run


def test_the_run_counts_how_far_back_the_text_agrees_with_lookups_match():
    copied = np.array([10, 11, 12, 13, 14, 15, 16, 99, 12, 13, 14, 15])  # 12..15 again, as a copy would write it
    assert lookup_chain(copied, 2).tolist() == [16, 99]
    assert match_run(copied, 8) == 4  # 12 13 14 15 agree; 11 against 99 does not
    assert match_run(copied, 3) == 3  # counted no further than the limit


def test_a_fresh_short_match_scores_its_size_and_no_match_scores_nothing():
    assert match_run(np.array([5, 6, 7, 1, 2, 6, 7]), 8) == 2  # "6 7" seen once before, after 5 (here: 2)
    assert match_run(np.array([1, 2, 3, 4]), 8) == 0
    assert continuation_start(np.array([1, 2, 3, 4])) is None
    assert match_run(np.array([7]), 8) == 0


def test_a_repeated_token_run_stops_at_the_start_of_the_history():
    tokens = np.array([3, 3, 3, 3, 3])  # the latest earlier "3 3 3" ends at index 3: its run reaches the start
    assert continuation_start(tokens) == 4 and match_run(tokens, 16) == 4


def earliest_copy_naive(tokens: list[int], max_ngram: int = 3) -> int | None:
    """The definition, written out: the latest earlier occurrence of the longest suffix (3 down to 1 tokens)."""
    n = len(tokens)
    for size in range(min(max_ngram, n - 1), 0, -1):
        for start in range(n - 1 - size, -1, -1):
            if tokens[start: start + size] == tokens[n - size:]:
                return start + size
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40))
def test_lookup_finds_what_the_definition_says(tokens):
    assert continuation_start(np.array(tokens, dtype=np.int64)) == earliest_copy_naive(tokens)
