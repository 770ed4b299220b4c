"""The static layout (fixed KV buffers, for CUDA graphs) against the dynamic one: the same top-K from the graph, the
same trees from the Expander while sequences join, leave, change batch bucket and outgrow the token buckets."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from cast_runtime.sessions import SessionStore
from draft_service.expansion import Budget, Expander, SequenceInput
from draft_service.export import sample_static_inputs
from draft_service.static_runner import TOKEN_BUCKETS, StaticRunner

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


def test_static_graph_equals_the_dynamic_graph(exported, static_exported):
    """The same tree written as rows over buffers (other columns random) and as a mask over a growing cache."""
    (dynamic_path, meta), (static_path, _) = exported, static_exported
    dims = {n: getattr(meta, n) for n in ("num_layers", "num_kv_heads", "head_dim", "vocab_size")}
    static_feeds, dynamic_feeds = sample_static_inputs(dims, "float32", batch=3, capacity=20, past_len=6, new=5,
                                                       ancestors=4, seed=5)
    got = ort.InferenceSession(str(static_path), providers=["CPUExecutionProvider"]).run(None, static_feeds)
    want = ort.InferenceSession(str(dynamic_path), providers=["CPUExecutionProvider"]).run(None, dynamic_feeds)
    np.testing.assert_array_equal(got[0][:, :, 1].astype(np.int64), want[1])
    np.testing.assert_allclose(got[0][:, :, 0], want[0], rtol=0, atol=1e-6)
    for have, present in zip(got[1:], want[2:]):  # columns 0..P+T-1 of the buffer are the grown cache
        np.testing.assert_allclose(have[:, :, : present.shape[2]], present, rtol=0, atol=1e-6)


def test_static_layout_grows_the_same_trees_as_sequences_move(runner, static_runner):
    """Calls that change the batch bucket (1, 2, 4, 8 and past 32), bring sequences back after another took their
    row, and commit more tokens than the largest token bucket: every tree equals the dynamic layout's."""
    host, device = expander(runner), expander(static_runner)
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
        want, _ = host.expand(sequences, budget)
        got, _ = device.expand(sequences, budget)
        assert_same_trees(got, want)
    assert 64 in static_runner.buffers and set(static_runner.buffers) <= {1, 2, 4, 8, 16, 32, 64}, \
        "34 sequences use buffers of 64 rows: past the buckets, batch sizes round up to a multiple of 32"
    for sid in "abcde":
        assert device.sessions.get(sid).length == host.sessions.get(sid).length
        assert len(device.sessions.get(sid).tokens) == device.sessions.get(sid).length


def test_two_expanders_on_one_runner_recompute_what_the_other_overwrote(runner, static_exported):
    """Buffer rows remember whose tokens they hold: a row taken by another expander's sequence is recomputed."""
    shared = StaticRunner(*static_exported, provider="cpu")
    first, second, host = expander(shared), expander(shared), expander(runner)
    want, _ = host.expand([seq("a", PROMPT)], EAGLE)
    assert_same_trees(first.expand([seq("a", PROMPT)], EAGLE)[0], want)
    second.expand([seq("a", [9, 9, 9, 9, 9, 9, 9, 9, 9])], EAGLE)  # same id, same length, other tokens, same row
    want, _ = host.expand([seq("a", [21, 22], 9)], EAGLE)
    assert_same_trees(first.expand([seq("a", [21, 22], 9)], EAGLE)[0], want)


def test_full_buffers_end_the_tree_and_keep_the_committed_tokens(runner, static_exported):
    """With 5 columns of tree room the tree stops after its first forwarded layer; the next call is unaffected."""
    small = StaticRunner(*static_exported, provider="cpu", capacity=len(PROMPT) + 6)
    device, host = expander(small, max_context=len(PROMPT) + 4), expander(runner, max_context=len(PROMPT) + 4)
    budget = Budget(top_k=3, max_depth=4, max_breadth=3)
    [cut], _ = device.expand([seq("a", PROMPT)], budget)
    [full], _ = host.expand([seq("a", PROMPT)], budget)
    assert [s.kept for s in full.layers] == [3, 3, 3, 0]
    assert [s.kept for s in cut.layers] == [3, 0], "the 5 columns before the trash one hold 3 nodes, not 3 more"
    cut.tree.validate()
    want, _ = host.expand([seq("a", [1, 2], len(PROMPT))], Budget(top_k=3, max_depth=1, max_breadth=3))
    got, _ = device.expand([seq("a", [1, 2], len(PROMPT))], Budget(top_k=3, max_depth=1, max_breadth=3))
    assert_same_trees(got, want)


def test_a_sequence_in_its_row_forwards_only_its_new_tokens(static_exported):
    """The point of keeping the KV in the buffers: a call commits its new tokens only, unless the row was lost."""
    runner = StaticRunner(*static_exported, provider="cpu")
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


def test_the_cost_table_profiles_the_static_runner(static_runner):
    from draft_service.profile import QUICK_GRID, profile_draft

    profile = profile_draft(static_runner, QUICK_GRID)
    table = profile.table
    assert table.millis.shape == (len(QUICK_GRID.batch_sizes), len(QUICK_GRID.context_buckets),
                                  len(QUICK_GRID.token_counts))
    assert (table.millis > 0).all()


def test_an_expand_that_first_runs_a_shape_says_it_is_cold(static_exported):
    """The orchestrator keeps such a call out of its cost model and draft gate (a capture costs many steps)."""
    from cast.v1 import common_pb2
    from draft_service.servicer import DraftServicer

    servicer = DraftServicer(expander(StaticRunner(*static_exported, provider="cpu")), common_pb2.ReplicaDescription())
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
