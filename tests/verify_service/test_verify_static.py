"""The verifier's tree forward (static_forward.py) computes the target's own logits (float64, 1e-9) for ragged
batches and subsets of non-consecutive slots, in the batch's own shapes (the CPU's) and in CUDA's bucketed ones, and
commits the target's own tokens as sequences join and leave. On the CPU it runs without capture: exactly the code a
CUDA graph captures, minus the capture; the capture bookkeeping is checked with a stand-in for torch.cuda's graph
API."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from cast.v1 import common_pb2, verify_pb2, verify_pb2_grpc
from cast_core.errors import InvalidArgument, ResourceExhausted
from cast_core.tree import TokenTree
from cast_runtime.wire import cost_table_from_proto
from verify_service.config import VerifyConfig
from verify_service.sampling import GREEDY, SamplingParams
from verify_service.server import start_server
from verify_service.static_forward import (
    StaticForward, bucket_for, buckets, context_buckets, static_mask, static_store,
)
from verify_service.target import TargetModel
from verify_service.verifier import PrefillItem, Verifier, VerifyItem

from tests.step_stub import StepStub
from verify_helpers import greedy_reference, tree_with_path


def random_tree(rng: np.random.Generator, root: int, vocab_size: int, extra: int) -> TokenTree:
    tree, _ = tree_with_path(rng, root, rng.integers(0, vocab_size, int(rng.integers(0, 4))).tolist(), 0,
                             vocab_size, extra_nodes=extra)
    return tree


def test_buckets():
    assert buckets((1, 2, 4, 8, 16, 32), 32) == (1, 2, 4, 8, 16, 32)
    assert buckets((1, 2, 4, 8, 16, 32), 12) == (1, 2, 4, 8, 12)
    assert context_buckets(1024) == (64, 128, 256, 512, 1024) and context_buckets(300) == (64, 128, 256, 300)
    assert [bucket_for(v, (1, 2, 4, 8)) for v in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


def test_static_mask_sees_the_prefix_and_the_visible_scratch_columns():
    visible = torch.tensor([[[1, 0], [1, 1]], [[1, 0], [0, 1]]], dtype=torch.bool)  # [2, 2, 2]
    mask = static_mask(torch.tensor([3, 0]), visible, 5, torch.float64)
    assert mask.shape == (2, 1, 2, 7) and mask.stride(2) % 16 == 0
    seen = mask[:, 0] == 0
    assert seen[0].tolist() == [[1, 1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1, 1]]
    assert seen[1].tolist() == [[0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 1]]
    assert (mask[~(mask == 0)] == torch.finfo(torch.float64).min).all()


ORACLE: dict[tuple, torch.Tensor] = {}  # the parametrised cases share their trees: one oracle run each


def full_forward_logits(oracle: TargetModel, prefix: list[int], tree: TokenTree) -> torch.Tensor:
    """[N, V]: node i's logits from transformers' forward over prefix + the root-to-node path, without a cache: one
    forward over every leaf's path (right-padded: a causal model's real positions never see the padding), which
    gives the logits of every node on it."""
    key = (tuple(prefix), tuple(tree.tokens.tolist()), tuple(tree.parents.tolist()))
    if key not in ORACLE:
        paths = []
        for leaf in sorted(set(range(len(tree))) - set(tree.parents.tolist())):
            path = [leaf]
            while tree.parents[path[-1]] >= 0:
                path.append(int(tree.parents[path[-1]]))
            paths.append(path[::-1])
        ids = torch.zeros(len(paths), len(prefix) + max(map(len, paths)), dtype=torch.long)
        for row, path in enumerate(paths):
            ids[row, : len(prefix) + len(path)] = torch.tensor(prefix + [int(tree.tokens[j]) for j in path])
        with torch.no_grad():
            out = oracle.model(ids).logits  # [leaves, T, V]
        logits = torch.empty(len(tree), oracle.vocab_size, dtype=oracle.dtype)
        for row, path in enumerate(paths):
            logits[path] = out[row, len(prefix) : len(prefix) + len(path)]
        ORACLE[key] = logits
    return ORACLE[key]


@pytest.mark.parametrize("bucketed", [False, True], ids=["exact", "bucketed"])
@pytest.mark.parametrize("batch", ["all", "shuffled", "subset"])
def test_tree_logits_equal_full_forwards_of_every_path(target64: TargetModel, oracle64: TargetModel, batch: str,
                                                       bucketed: bool):
    """Ragged contexts (one past the first context bucket) and ragged trees (across token buckets); `subset`: slots
    {0, 2, 5} in request order 5, 0, 2, so rows 0..5 (0..7 bucketed) run with slots 1, 3, 4 (the longest context) as
    dummy rows. Bucketed: the shapes CUDA graphs replay, run eagerly."""
    rng = np.random.default_rng(21)
    contexts = (0, 1, 5, 13, 90, 2)
    prefixes = [rng.integers(0, target64.vocab_size, c).tolist() for c in contexts]
    store = static_store(target64, slots=8, max_tree_tokens=48)
    forward = StaticForward(target64, store, max_tree_tokens=48)  # no CUDA here: runs eagerly
    forward.bucketed = bucketed
    kvs = [store.allocate() for _ in prefixes]
    target64.prefill(kvs, prefixes)
    trees = [random_tree(rng, int(rng.integers(target64.vocab_size)), target64.vocab_size, extra)
             for extra in (0, 3, 30, 7, 12, 1)]
    picks = {"all": range(6), "shuffled": rng.permutation(6), "subset": [5, 0, 2]}[batch]
    got = forward.tree_logits([kvs[i] for i in picks], [trees[i] for i in picks])
    for g, i in zip(got, picks, strict=True):
        assert g.shape == (len(trees[i]), target64.vocab_size)
        # An empty prefix has nothing before the root: the oracle sees the root alone.
        torch.testing.assert_close(g, full_forward_logits(oracle64, prefixes[i], trees[i]), rtol=1e-9, atol=1e-9)
    assert [kv.length for kv in kvs] == list(contexts)  # nothing kept
    # No committed entry was overwritten, in the batch or in the dummy rows: every sequence still sees its prefix.
    roots = [TokenTree.root_only(3)] * 6
    for g, kv, prefix in zip(forward.tree_logits(kvs, roots), kvs, prefixes, strict=True):
        torch.testing.assert_close(g, full_forward_logits(oracle64, prefix, roots[0]), rtol=1e-9, atol=1e-9)


def assert_same_kv(fused: Verifier, oracle: Verifier, sequence_ids) -> None:
    for s in sequence_ids:
        a, b = fused.sessions.get(s).kv, oracle.sessions.get(s).kv
        assert a.length == b.length
        for la, lb in zip(fused.kv.layers, oracle.kv.layers, strict=True):
            for x, y in ((la.keys, lb.keys), (la.values, lb.values)):
                torch.testing.assert_close(x[a.slot, :, : a.length], y[b.slot, :, : b.length], rtol=1e-9, atol=1e-9)


def test_verifier_matches_one_on_the_transformers_forward_step_for_step(target64: TargetModel, oracle64: TargetModel):
    """Two verifiers, the service's (fused forward) and one on transformers' forward, fed the same calls: ragged
    sequences join (batched prefills) and leave (release moves slots), some steps verify a subset (non-consecutive
    slots, dummy rows), greedy and seeded sampling mixed. The service's verifier runs CUDA's bucketed shapes, the
    other the batch's own. Same results every step, the greedy ones are the target's own output, and the committed
    KV is the same."""
    rng = np.random.default_rng(22)
    static = Verifier(target64, max_batch=8, session_ttl_s=60, max_tree_tokens=32)
    static.static.bucketed = True  # as on CUDA, without the graphs
    eager = Verifier(oracle64, max_batch=8, session_ttl_s=60, max_tree_tokens=32)
    lengths = (1, 3, 70, 2, 25, 6, 1, 17)
    prompts = [rng.integers(1, target64.vocab_size, n).tolist() for n in lengths]
    budgets = [int(rng.integers(5, 25)) for _ in prompts]
    params = [GREEDY if s % 2 == 0 else SamplingParams(temperature=1.0, top_k=40, seed=100 + s) for s in range(8)]
    refs = {s: greedy_reference(target64, prompts[s], budgets[s]) for s in range(8) if params[s].greedy}
    joins = {0: [0, 1, 2], 2: [3, 4], 5: [5, 6, 7]}  # step -> sequences that join before it
    committed: dict[int, list[int]] = {}
    pending: dict[int, int] = {}
    step = 0
    while step <= max(joins) or any(len(committed[s]) < budgets[s] for s in committed):
        if step in joins:
            items = [PrefillItem(f"s{s}", prompts[s]) for s in joins[step]]
            static.prefill(items)
            eager.prefill(items)
            for s in joins[step]:
                committed[s], pending[s] = [], prompts[s][-1]
        live = [s for s in committed if len(committed[s]) < budgets[s]]
        if step % 3 == 2 and len(live) > 2:
            live = live[1::2]  # a subset: not every live slot is in the batch
        items, expected = [], []
        for s in live:
            k = len(committed[s])
            if s in refs:
                depth = int(rng.integers(0, min(5, len(refs[s]) - k)))
                tree, path = tree_with_path(rng, pending[s], refs[s][k : k + depth], refs[s][k + depth],
                                            target64.vocab_size, int(rng.integers(0, 12)))
            else:
                tree, path = random_tree(rng, pending[s], target64.vocab_size, int(rng.integers(0, 12))), None
            items.append(VerifyItem(f"s{s}", tree, params[s]))
            expected.append(path)
        if items:
            order = rng.permutation(len(items))
            got, _ = static.verify([items[i] for i in order])
            want, _ = eager.verify([items[i] for i in order])
            assert got == want
            for i, result in zip(order, got):
                s = int(items[i].sequence_id[1:])
                if expected[i] is not None:
                    assert result.accepted_nodes == expected[i]
                committed[s] += result.committed_tokens
                pending[s] = result.bonus_token
            assert_same_kv(static, eager, [f"s{s}" for s in committed if len(committed[s]) < budgets[s]])
            for s in list(committed):
                if len(committed[s]) >= budgets[s] and f"s{s}" in static.sessions:
                    static.release([f"s{s}"])
                    eager.release([f"s{s}"])
        step += 1
    for s, ref in refs.items():
        assert committed[s][: len(ref)] == ref, s
    assert len(static.sessions) == 0 and static.kv.owners == []


def test_a_store_larger_than_the_free_memory_is_refused_naming_the_flags(target64: TargetModel, monkeypatch):
    from verify_service import static_forward

    store = static_store(target64, slots=4, max_tree_tokens=8)
    monkeypatch.setattr(static_forward, "free_memory", lambda device: store.nbytes)  # 90% of it is too little
    with pytest.raises(ValueError, match=r"KV store needs .* lower --max-context or --max-batch"):
        Verifier(target64, max_batch=4, session_ttl_s=60, max_tree_tokens=8)
    assert Verifier(target64, max_batch=2, session_ttl_s=60, max_tree_tokens=8).kv.slot_capacity == 2


def test_limits(target64: TargetModel):
    now = [0.0]
    verifier = Verifier(target64, max_batch=2, session_ttl_s=10, clock=lambda: now[0], max_tree_tokens=4)
    verifier.prefill([PrefillItem("a", [1, 2]), PrefillItem("b", [3])])
    with pytest.raises(ResourceExhausted):
        verifier.prefill([PrefillItem("c", [4])])
    big = TokenTree.from_lists([2, 5, 6, 7, 8], [-1, 0, 0, 0, 0], [0, 1, 1, 1, 1], [1.0] * 5)
    with pytest.raises(InvalidArgument, match=r"sequences\[1\]\.tree\.tokens: a tree of 5 nodes exceeds .* 4"):
        verifier.verify([VerifyItem("b", TokenTree.root_only(3)), VerifyItem("a", big)])
    assert verifier.sessions.get("a").kv.length == 1  # nothing happened to either sequence
    (result,), _ = verifier.verify([VerifyItem("a", big.subtree(np.arange(4)))])
    assert result.committed_tokens[-1] == greedy_reference(target64, [1, 2] + result.committed_tokens[:-1], 1)[0]
    now[0] = 20.0  # a and b expire when c needs room: their slots come back
    verifier.prefill([PrefillItem("c", [4, 5, 6])])
    assert verifier.kv.owners == [verifier.sessions.get("c").kv]
    (result,), _ = verifier.verify([VerifyItem("c", TokenTree.root_only(6))])
    assert result.committed_tokens == greedy_reference(target64, [4, 5, 6], 1)


async def test_limits_over_grpc_are_named(tiny_pair):
    config = VerifyConfig(model=tiny_pair[0], host="127.0.0.1", port=0, dtype="float64", device="cpu",
                          max_context=64, max_batch=2, max_tree_tokens=4)
    server, port = await start_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = StepStub(verify_pb2_grpc.VerifyServiceStub(channel))
            # The start-up table was profiled through the verifier: no batch or tree it cannot serve.
            table = cost_table_from_proto((await stub.Describe(verify_pb2.VerifyDescribeRequest())).replica.cost_table)
            assert table.batch_sizes == (1, 2) and table.token_counts == (1, 2, 4)
            for s in ("a", "b"):
                await stub.Prefill(verify_pb2.PrefillRequest(
                    sequences=[verify_pb2.PrefillSequence(sequence_id=s, token_ids=[1, 2])]))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Prefill(verify_pb2.PrefillRequest(
                    sequences=[verify_pb2.PrefillSequence(sequence_id="c", token_ids=[1])]))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            tree = common_pb2.TokenTree(tokens=[2, 3, 4, 5, 6], parents=[-1, 0, 0, 0, 0], depths=[0, 1, 1, 1, 1],
                                        values=[1.0] * 5)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Verify(verify_pb2.VerifyRequest(
                    sequences=[verify_pb2.VerifySequence(sequence_id="a", tree=tree)]))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "sequences[0].tree.tokens" in e.value.details() and "--max-tree-tokens" in e.value.details()
            ok = common_pb2.TokenTree(tokens=[2, 3], parents=[-1, 0], depths=[0, 1], values=[1.0, 1.0])
            response = await stub.Verify(verify_pb2.VerifyRequest(
                sequences=[verify_pb2.VerifySequence(sequence_id="b", tree=ok)]))
            assert len(response.results[0].committed_tokens) >= 1
    finally:
        await server.stop(None)


class StandInGraph:
    replays = 0

    def replay(self):
        StandInGraph.replays += 1


@pytest.fixture
def stand_in_cuda_graphs(monkeypatch) -> list:
    """No GPU here: torch.cuda's graph API is replaced by stand-ins whose capture runs the body eagerly and whose
    replay does nothing. Returns the list of captures made ((pool, capture_error_mode) each)."""
    import contextlib

    class Stream:
        def wait_stream(self, other):
            pass

    captures = []

    @contextlib.contextmanager
    def graph(g, pool=None, capture_error_mode="global"):
        captures.append((pool, capture_error_mode))
        yield

    StandInGraph.replays = 0
    for name, value in {"Stream": lambda *a, **k: Stream(), "stream": lambda s: contextlib.nullcontext(),
                        "current_stream": lambda *a: Stream(), "device": lambda d: contextlib.nullcontext(),
                        "CUDAGraph": StandInGraph, "graph": graph, "synchronize": lambda *a: None,
                        "set_stream": lambda s: None}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    return captures


def test_graph_path_control_flow_with_a_stand_in_for_cuda(target64: TargetModel, stand_in_cuda_graphs, monkeypatch,
                                                          caplog):
    """Checks the bookkeeping around capture: one graph per bucket in the shared pool, the logits read from the
    static output buffer, and a failed capture leaving its bucket eager with one warning. The reference is the
    same forward run eagerly (as on the CPU), on a store of its own."""
    captures = stand_in_cuda_graphs
    rng = np.random.default_rng(23)
    prefixes = [rng.integers(0, target64.vocab_size, c).tolist() for c in (3, 70, 5)]
    forward = StaticForward(target64, static_store(target64, slots=8, max_tree_tokens=32), max_tree_tokens=32)
    forward.use_graphs, forward.bucketed, forward.pool = True, True, "pool"  # as on CUDA
    eager = StaticForward(target64, static_store(target64, slots=8, max_tree_tokens=32), max_tree_tokens=32)
    skvs, ekvs = [forward.store.allocate() for _ in prefixes], [eager.store.allocate() for _ in prefixes]
    target64.prefill(skvs, prefixes)
    target64.prefill(ekvs, prefixes)
    trees = [random_tree(rng, 5, target64.vocab_size, extra) for extra in (0, 6, 20)]
    for g, w in zip(forward.tree_logits(skvs, trees), eager.tree_logits(ekvs, trees), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)  # written by the capture run into the static output
        assert g.data_ptr() >= forward.logits.data_ptr()
    assert list(forward.graphs) == [(4, bucket_for(max(map(len, trees)), forward.token_buckets), 128)]
    assert captures == [("pool", "thread_local")] and StandInGraph.replays == 1
    assert forward.logits.numel() == 8 * 32 * target64.vocab_size

    def fail(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", fail)
    for _ in range(2):
        (got,) = forward.tree_logits(skvs[:1], trees[:1])
        torch.testing.assert_close(got, eager.tree_logits(ekvs[:1], trees[:1])[0], rtol=1e-9, atol=1e-9)
    assert forward.graphs[(1, bucket_for(len(trees[0]), forward.token_buckets), 64)] is None
    assert forward.capture_failures == 1
    assert sum("capture failed" in r.message for r in caplog.records) == 1


def test_a_verify_that_captures_a_graph_says_so(target64: TargetModel, stand_in_cuda_graphs):
    """The orchestrator must not take a capture (10-100x a step on a GPU) for a step's cost: Verify says when it
    made one, which is the first time a (batch, tree tokens, context) bucket comes up."""
    verifier = Verifier(target64, max_batch=4, session_ttl_s=60, max_tree_tokens=16)
    verifier.static.use_graphs, verifier.static.bucketed, verifier.static.pool = True, True, "pool"  # as on CUDA
    verifier.prefill([PrefillItem("a", [1, 2, 3])])

    def step(extra_nodes: int) -> bool:
        root = verifier.sessions.get("a").pending
        tree = random_tree(np.random.default_rng(extra_nodes), root, target64.vocab_size, extra_nodes)
        return verifier.verify_noting_captures([VerifyItem("a", tree)])[2]

    assert [step(0), step(0), step(6), step(6), step(0)] == [True, False, True, False, False]
    assert len(stand_in_cuda_graphs) == 2
