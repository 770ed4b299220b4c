"""The runner's two buffer modes (fixed: the CUDA path, here without graphs; growing: the CPU default) grow the same
trees while sequences join, leave, change batch bucket, outgrow the token buckets and lose their buffer rows."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from cast_runtime.sessions import SessionStore
from draft_service.expansion import Budget, Expander, SequenceInput
from draft_service.export import sample_tree
from draft_service.runner import COLUMN_STEP, TOKEN_BUCKETS, DraftRunner

PROMPT = [5, 17, 99, 3, 200, 42, 7, 310, 64]
EAGLE = Budget(top_k=4, max_depth=4, max_breadth=3)


def seq(sid: str, tokens, start: int = 0) -> SequenceInput:
    return SequenceInput(sid, np.asarray(tokens, dtype=np.int64), start)


def expander(runner, max_context: int | None = None) -> Expander:
    return Expander(runner, SessionStore(64, 60.0), max_context or runner.meta.max_context)


def assert_same_trees(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.sequence_id == w.sequence_id and g.layers == w.layers
        np.testing.assert_array_equal(g.tree.tokens, w.tree.tokens)
        np.testing.assert_array_equal(g.tree.parents, w.tree.parents)
        np.testing.assert_allclose(g.tree.values, w.tree.values, rtol=0, atol=1e-5)


def test_both_buffer_modes_grow_the_same_trees_as_sequences_move(exported, fixed_runner):
    """Calls that change the batch bucket (1, 2, 4, 8 and past 32), bring sequences back after another took their
    row, and commit more tokens than the largest token bucket: every tree of growing buffers equals fixed ones'."""
    growing = DraftRunner(*exported, provider="cpu")
    fixed, grown = expander(fixed_runner), expander(growing)
    long_prompt = list(range(3, 3 + TOKEN_BUCKETS[-1] + 9))  # past the largest bucket: the flexible session
    many = [seq(f"m{i}", [i + 1, i + 2, i + 3]) for i in range(34)]  # past the largest batch bucket
    calls = [
        ([seq("a", PROMPT)], EAGLE),
        ([seq("a", [11, 12], 9), seq("b", [1, 2])], EAGLE),
        ([seq("b", [7], 2), seq("c", long_prompt)], EAGLE),
        ([seq("a", [13, 14, 15], 11), seq("c", [8], len(long_prompt)), seq("d", [4, 4, 4, 4])], Budget(3, 5, 2)),
        ([seq("d", [9, 10], 4)], Budget(8, 2, 8)),  # d moves from bucket 4 to bucket 1: recomputed there
        (many, Budget(2, 2, 2)),
        ([seq("a", [1, 2, 3, 4], 14), seq("b", [5], 3), seq("c", [6, 6], len(long_prompt) + 1),
          seq("d", [9], 6), seq("e", PROMPT)], EAGLE),
        ([seq("a", [7], 18)], EAGLE),  # bucket 1's row was d's: a is recomputed
    ]
    for sequences, budget in calls:
        want, _ = fixed.expand(sequences, budget)
        got, _ = grown.expand(sequences, budget)
        assert_same_trees(got, want)
    assert 64 in growing.buffers and set(growing.buffers) <= {1, 2, 4, 8, 16, 32, 64}, \
        "34 sequences use buffers of 64 rows: past the buckets, batch sizes round up to a multiple of 32"
    for sid in "abcde":
        assert grown.sessions.get(sid).length == fixed.sessions.get(sid).length
        assert len(grown.sessions.get(sid).tokens) == grown.sessions.get(sid).length


def test_growing_buffers_widen_for_a_long_sequence_and_narrow_after_it(exported, fixed_runner):
    """A bucket's buffers are as wide as its longest sequence and a tree need (a CPU forward attends over all of
    them); once only short sequences run there they narrow, and a long one that comes back is recomputed, with the
    same trees."""
    growing = DraftRunner(*exported, provider="cpu")
    fixed, grown = expander(fixed_runner), expander(growing)
    budget = Budget(top_k=3, max_depth=3, max_breadth=2)
    long_prompt = [(7 * i) % 500 + 1 for i in range(640)]
    steps = [
        [seq("short", PROMPT), seq("long", long_prompt[:110])],
        [seq("short", [1], 9), seq("long", long_prompt[110:], 110)],
        [seq("short", [2], 10), seq("other", [3, 4])],  # long is idle: its row stays, the buffers narrow
        [seq("short", [5], 11), seq("long", [6], len(long_prompt))],  # long comes back: recomputed
    ]
    widths = []
    for sequences in steps:
        want, _ = fixed.expand(sequences, budget)
        got, _ = grown.expand(sequences, budget)
        assert_same_trees(got, want)
        widths.append(growing.buffers[2].columns)
    tree = (budget.max_depth - 1) * budget.max_breadth  # the columns a tree may use, made room for at the commit
    for width, committed in ((widths[0], 110), (widths[1], len(long_prompt))):
        assert committed + tree + 1 <= width < committed + tree + 1 + COLUMN_STEP, "the tokens, a tree, a trash column"
    assert widths[2] < 100 and widths[3] == widths[1]
    assert fixed_runner.buffers[2].columns == fixed_runner.capacity, "fixed buffers never change"


def test_two_expanders_on_one_runner_recompute_what_the_other_overwrote(exported, fixed_runner):
    """Buffer rows remember whose tokens they hold: a row taken by another expander's sequence is recomputed."""
    shared = DraftRunner(*exported, provider="cpu")
    first, second, reference = expander(shared), expander(shared), expander(fixed_runner)
    want, _ = reference.expand([seq("a", PROMPT)], EAGLE)
    assert_same_trees(first.expand([seq("a", PROMPT)], EAGLE)[0], want)
    second.expand([seq("a", [9, 9, 9, 9, 9, 9, 9, 9, 9])], EAGLE)  # same id, same length, other tokens, same row
    want, _ = reference.expand([seq("a", [21, 22], 9)], EAGLE)
    assert_same_trees(first.expand([seq("a", [21, 22], 9)], EAGLE)[0], want)


@pytest.mark.parametrize("fixed_buffers", [True, False])
def test_full_buffers_end_the_tree_and_keep_the_committed_tokens(exported, fixed_runner, fixed_buffers):
    """With 5 columns of tree room the tree stops after its first forwarded layer; the next call is unaffected."""
    small = DraftRunner(*exported, provider="cpu", capacity=len(PROMPT) + 6, fixed_buffers=fixed_buffers)
    cut_ex, full_ex = expander(small, len(PROMPT) + 4), expander(fixed_runner, len(PROMPT) + 4)
    budget = Budget(top_k=3, max_depth=4, max_breadth=3)
    [cut], _ = cut_ex.expand([seq("a", PROMPT)], budget)
    [full], _ = full_ex.expand([seq("a", PROMPT)], budget)
    assert [s.kept for s in full.layers] == [3, 3, 3, 0]
    assert [s.kept for s in cut.layers] == [3, 0], "the 5 columns before the trash one hold 3 nodes, not 3 more"
    cut.tree.validate()
    want, _ = full_ex.expand([seq("a", [1, 2], len(PROMPT))], Budget(top_k=3, max_depth=1, max_breadth=3))
    got, _ = cut_ex.expand([seq("a", [1, 2], len(PROMPT))], Budget(top_k=3, max_depth=1, max_breadth=3))
    assert_same_trees(got, want)


@pytest.mark.parametrize("fixed_buffers", [True, False])
def test_a_sequence_in_its_row_forwards_only_its_new_tokens(exported, fixed_buffers):
    """The point of keeping the KV in the buffers: a call commits its new tokens only, unless the row was lost."""
    runner = DraftRunner(*exported, provider="cpu", fixed_buffers=fixed_buffers)
    commits = []
    run = runner.run
    runner.run = lambda rows: commits.append(int((rows[..., 3] > 0).sum())) or run(rows)  # real rows see >= 1
    ex, other = expander(runner), expander(runner)
    budget = Budget(top_k=2, max_depth=0, max_breadth=2)  # commit only: one forward a call
    ex.expand([seq("a", PROMPT)], budget)
    ex.expand([seq("a", [1, 2], 9)], budget)
    ex.rewind("a", 10)
    ex.expand([seq("a", [3], 10)], budget)
    other.expand([seq("z", [4, 4])], budget)  # takes bucket 1's only row
    ex.expand([seq("a", [5], 11)], budget)
    assert commits == [9, 2, 1, 2, 12], "prompt, 2 new, 1 after the rewind, z's prompt, a's 11 + 1 recomputed"


def test_the_cost_table_profiles_fixed_buffers(fixed_runner):
    from draft_service.profile import QUICK_GRID, profile_draft

    profile = profile_draft(fixed_runner, QUICK_GRID)
    table = profile.table
    assert table.millis.shape == (len(QUICK_GRID.batch_sizes), len(QUICK_GRID.context_buckets),
                                  len(QUICK_GRID.token_counts))
    assert (table.millis > 0).all()


def test_an_expand_that_first_runs_a_shape_says_it_is_cold(exported):
    """The orchestrator keeps such a call out of its cost model and draft gate (a capture costs many steps)."""
    from cast.v1 import common_pb2
    from draft_service.servicer import DraftServicer

    runner = DraftRunner(*exported, provider="cpu", fixed_buffers=True)
    servicer = DraftServicer(expander(runner), common_pb2.ReplicaDescription())
    try:
        budget = Budget(top_k=2, max_depth=2, max_breadth=2)
        _, _, cold = servicer.timed_expand([seq("a", PROMPT)], budget)
        assert cold, "new buckets: the prompt's, and the tree layers'"
        _, _, cold = servicer.timed_expand([seq("b", PROMPT)], budget)  # a's row is b's now: the same shapes
        assert not cold
        _, _, cold = servicer.timed_expand([seq("a", [1], 9), seq("b", [2], 9)], budget)  # batch bucket 2: new
        assert cold
    finally:
        servicer.close()


def test_defaults_follow_the_provider(runner, fixed_runner):
    from draft_service.runner import choose_dtype

    assert (runner.fixed_buffers, runner.cuda_graphs) == (False, False)
    assert not runner.weights, "one session: it loads its own weights"
    assert fixed_runner.weights, "bucket sessions: they share the runner's"
    assert runner.backend == "onnxruntime:CPUExecutionProvider+growing"
    assert fixed_runner.backend == "onnxruntime:CPUExecutionProvider+static"
    assert choose_dtype("auto", "CUDAExecutionProvider") == "float16"
    assert choose_dtype("auto", "CPUExecutionProvider") == "float32"
    assert choose_dtype("float32", "CUDAExecutionProvider") == "float32"
    with pytest.raises(ValueError, match="cuda_graphs"):
        DraftRunner(runner.onnx_path, runner.meta, provider="cpu", cuda_graphs=True)


def test_forwards_sliced_to_a_few_rows_and_buckets_sharing_memory_grow_the_same_trees(exported):
    """A runner that slices every forward into 8 rows and reserves memory for 2 sequences (larger buckets then get
    their own) grows the same trees as one forward per call: prompts, recomputes, trees and bucket changes."""
    whole = expander(DraftRunner(*exported, provider="cpu", max_rows=10**6))
    sliced_runner = DraftRunner(*exported, provider="cpu", max_rows=8, max_batch=2)
    sliced = expander(sliced_runner)
    long_prompt = [(5 * i) % 400 + 1 for i in range(90)]
    calls = [
        ([seq("a", PROMPT), seq("b", long_prompt)], EAGLE),          # bucket 2: the reserved memory
        ([seq("a", [11, 12], 9)], Budget(8, 3, 8)),                  # bucket 1 writes it: b's row is void
        ([seq("a", [13], 11), seq("b", [1, 2, 3], 90), seq("c", long_prompt)], EAGLE),  # bucket 4: its own
        ([seq("a", [14], 12), seq("b", [4], 93)], Budget(4, 4, 4)),  # back to bucket 2: both recomputed
    ]
    for sequences, budget in calls:
        want, _ = whole.expand(sequences, budget)
        got, _ = sliced.expand(sequences, budget)
        assert_same_trees(got, want)
    assert set(sliced_runner.storage) == {2, 4}, "buckets 1 and 2 share the reserved memory, bucket 4 has its own"


def test_sessions_on_the_shared_weights_compute_what_the_graph_with_its_own_weights_computes(wide_exported):
    """A bucket session and the flexible one, both on the runner's one copy of the weights, give the same top-K and
    KV, to the bit, as a session that loads the graph's weights itself, on a tree with past KV. (Without prepacking,
    as the runner's sessions on CPU: prepacked MatMul weights round differently, by up to 3e-5 in the KV here.)"""
    onnx_path, meta = wide_exported
    runner = DraftRunner(onnx_path, meta, provider="cpu", fixed_buffers=True, capacity=12, ancestors=3)
    dims = {name: getattr(meta, name) for name in ("num_layers", "num_kv_heads", "head_dim", "vocab_size")}
    feeds = sample_tree(dims, meta.dtype, batch=2, capacity=12, new=4, ancestors=3).feeds
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    own = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    want = own.run(None, feeds)
    for session in (runner._bucket(2, 4).session, runner.flexible):
        for have, expected in zip(session.run(None, feeds), want):  # top-K, then KV
            np.testing.assert_array_equal(have, expected)
