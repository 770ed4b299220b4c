"""Hypothesis strategies and checks for fuzzing the three services over loopback (test_fuzz.py).

Each fuzz property sends many random or malformed messages to a running service and asserts what a client may
rely on: every call ends with OK or a status of the documented set, an OK answer is well-formed, and whatever a
call created is released at the end (the tests check the service's live sequences afterwards).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import grpc
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cast.v1 import (common_pb2, draft_pb2, draft_pb2_grpc, generation_pb2, generation_pb2_grpc, verify_pb2,
                     verify_pb2_grpc)

# What bad input may answer: the request's fault, named (never INTERNAL or UNKNOWN: those are the service's bugs).
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}
STATUS_OF = {code.value[0]: code for code in grpc.StatusCode}
# The fixed budget: examples per property (deterministic: derandomized, no example database). No shrinking: the
# services keep state between calls, so a replayed example may not fail again; the first failure is the report.
EXAMPLES = int(os.environ.get("CAST_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))

INT32 = st.one_of(st.integers(-3, 600), st.integers(-2**31, 2**31 - 1))
FLOATS = st.one_of(st.floats(-2.0, 3.0), st.floats(allow_nan=True, allow_infinity=True, width=32))
IDS = st.one_of(st.sampled_from(["", "a", "seq-1"]), st.text(max_size=40), st.text(min_size=2000, max_size=3000))


def refused_with(code: grpc.StatusCode, details: str, what: str) -> None:
    assert code in REFUSALS, f"{what}: {code.name} {details!r}"
    assert details, f"{what}: {code.name} without a message"


def call(fn, *args, **kw):
    """(reply, None) or (None, (code, details))."""
    try:
        return fn(*args, **kw), None
    except grpc.RpcError as e:
        return None, (e.code(), e.details() or "")


def one_step(stream_method, request, timeout: float = 30.0):
    """Send one message on a fresh step stream; (response, None) or (None, (code, details)) from its StepError or
    the stream's own status."""
    try:
        replies = list(stream_method(iter([request]), timeout=timeout))
    except grpc.RpcError as e:
        return None, (e.code(), e.details() or "")
    assert len(replies) == 1, f"{len(replies)} answers to one request"
    reply = replies[0]
    if reply.HasField("error"):
        return None, (STATUS_OF.get(reply.error.code, grpc.StatusCode.UNKNOWN), reply.error.message)
    return reply.response, None


# --- trees: mostly well formed, so that the checks past validation are reached, then perhaps broken -------------

@st.composite
def trees(draw, vocab: int, root: int | None) -> common_pb2.TokenTree:
    n = draw(st.integers(1, 12))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    depths = [0] * n
    for i in range(1, n):
        depths[i] = depths[parents[i]] + 1
    tokens = [draw(st.integers(0, vocab - 1)) for _ in range(n)]
    if root is not None and draw(st.booleans() | st.just(True)):
        tokens[0] = root
    values = [draw(st.floats(0, 1, width=32)) for _ in range(n)]
    fault = draw(st.sampled_from(["none", "none", "parent", "cycle", "negative_parent", "depth", "token", "length",
                                  "empty", "huge", "duplicate"]))
    if fault == "parent" and n > 1:  # out of range: past the end, or any int32
        i = draw(st.integers(1, n - 1))
        parents[i] = draw(st.one_of(st.integers(n, n + 50), INT32))
    elif fault == "cycle" and n > 2:  # a parent at or after its child (depths made to agree, so only order is wrong)
        i = draw(st.integers(1, n - 2))
        j = draw(st.integers(i, n - 1))
        parents[i], depths[i] = j, depths[j] + 1
    elif fault == "negative_parent" and n > 1:
        parents[draw(st.integers(1, n - 1))] = draw(st.integers(-5, -1))
    elif fault == "depth":
        depths[draw(st.integers(0, n - 1))] = draw(INT32)
    elif fault == "token":
        tokens[draw(st.integers(0, n - 1))] = draw(st.one_of(st.integers(vocab, vocab + 10), st.integers(-2**31, -1)))
    elif fault == "length":
        which = draw(st.sampled_from([parents, depths, values, tokens]))
        which.append(0) if draw(st.booleans()) else which.pop()
    elif fault == "empty":
        tokens, parents, depths, values = [], [], [], []
    elif fault == "huge":  # a chain longer than any tree a verifier takes
        m = draw(st.integers(129, 400))
        tokens, parents, depths, values = [tokens[0]] * m, [-1, *range(m - 1)], list(range(m)), [0.5] * m
    elif fault == "duplicate" and n > 1:  # siblings with the same token: legal, the first one is tried first
        i = draw(st.integers(1, n - 1))
        tokens.append(tokens[i]), parents.append(parents[i]), depths.append(depths[i]), values.append(values[i])
    return common_pb2.TokenTree(tokens=tokens, parents=parents, depths=depths, values=values)


def sampling() -> st.SearchStrategy[verify_pb2.SamplingParams]:
    return st.builds(verify_pb2.SamplingParams, temperature=FLOATS, top_p=FLOATS, top_k=st.one_of(st.integers(-2, 50), INT32),
                     seed=st.integers(0, 2**64 - 1), has_seed=st.booleans())


def check_accepted(tree: common_pb2.TokenTree, result: verify_pb2.VerifyResult, vocab: int) -> None:
    """An accepted path starts below the root and follows parent links; the committed tokens are its tokens and a
    bonus token from the vocabulary."""
    node = 0
    for a in result.accepted_nodes:
        assert 0 < a < len(tree.tokens) and tree.parents[a] == node, (list(tree.parents), list(result.accepted_nodes))
        node = a
    committed = list(result.committed_tokens)
    assert committed[:-1] == [tree.tokens[a] for a in result.accepted_nodes]
    assert 0 <= committed[-1] < vocab


# --- the verify service -------------------------------------------------------------------------------------------

def fuzz_verify(address: str, vocab: int, max_context: int, examples: int = EXAMPLES) -> None:
    """Prefill a fresh sequence (and random Prefills), then Verify random trees on it; release everything."""
    with grpc.insecure_channel(address) as channel:
        stub = verify_pb2_grpc.VerifyServiceStub(channel)

        @settings(FUZZ, max_examples=examples)
        @given(st.data())
        def verify_property(data) -> None:
            created: list[str] = []
            try:
                # Random Prefills: ids empty, repeated, huge; prompts empty, too long, out of the vocabulary.
                prefills = data.draw(st.lists(st.builds(
                    verify_pb2.PrefillSequence, sequence_id=IDS,
                    token_ids=st.one_of(st.lists(st.integers(0, vocab - 1), max_size=30), st.lists(INT32, max_size=5),
                                        st.lists(st.just(1), min_size=max_context + 1, max_size=max_context + 2))),
                    max_size=3), label="prefills")
                _, error = call(stub.Prefill, verify_pb2.PrefillRequest(sequences=prefills), timeout=30)
                if error is None:
                    created += [p.sequence_id for p in prefills]
                else:
                    refused_with(*error, "Prefill")
                # A good sequence, then steps on it with random trees and sampling, and ids known or not.
                sid = f"fuzz-{data.draw(st.integers(0, 2**32))}"
                prompt = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=20), label="prompt")
                _, error = call(stub.Prefill, verify_pb2.PrefillRequest(
                    sequences=[verify_pb2.PrefillSequence(sequence_id=sid, token_ids=prompt)]), timeout=30)
                assert error is None, error
                created.append(sid)
                pending = prompt[-1]
                for _ in range(data.draw(st.integers(1, 4))):
                    tree = data.draw(trees(vocab, pending), label="tree")
                    target = data.draw(st.sampled_from([sid, sid, sid, "unknown-sequence", ""]))
                    items = [verify_pb2.VerifySequence(sequence_id=target, tree=tree,
                                                       sampling=data.draw(sampling() | st.just(verify_pb2.SamplingParams())))]
                    if data.draw(st.integers(0, 5)) == 0:  # the same sequence twice in one request
                        items.append(items[0])
                    response, error = one_step(stub.VerifyStream, verify_pb2.VerifyRequest(sequences=items))
                    if error is not None:
                        refused_with(*error, "Verify")
                        continue
                    assert [r.sequence_id for r in response.results] == [sid]
                    check_accepted(tree, response.results[0], vocab)
                    pending = response.results[0].committed_tokens[-1]
                # Release: known, unknown, repeated ids; always OK.
                extra = data.draw(st.lists(IDS, max_size=3))
                reply, error = call(stub.Release, verify_pb2.VerifyReleaseRequest(sequence_ids=created + extra + created),
                                    timeout=30)
                assert error is None, error
                assert reply.released == len(set(created)), (reply.released, created)
                created = []
            finally:
                if created:
                    stub.Release(verify_pb2.VerifyReleaseRequest(sequence_ids=created), timeout=30)

        verify_property()


# --- the draft service --------------------------------------------------------------------------------------------

def budgets(top_k: int) -> st.SearchStrategy[draft_pb2.ExpandBudget]:
    small = st.integers(-2, 10)
    cast = st.builds(
        draft_pb2.CastBudget, node_buckets=st.lists(INT32, max_size=4), token_counts=st.lists(INT32, max_size=4),
        normalized_cost=st.lists(FLOATS, max_size=16), breadth_threshold=FLOATS, depth_threshold=FLOATS,
        gain_mean=FLOATS, value_scale=FLOATS, step_base_cost=FLOATS, depth_scales=st.lists(FLOATS, max_size=10),
        sibling_scales=st.lists(FLOATS, max_size=10))
    return st.builds(draft_pb2.ExpandBudget, top_k=st.one_of(st.integers(0, top_k + 1), INT32),
                     max_depth=st.one_of(small, INT32), max_breadth=st.one_of(small, INT32),
                     max_returned_nodes=st.one_of(st.integers(-2, 40), INT32),
                     cast=st.none() | cast)


def fuzz_draft(address: str, vocab: int, max_context: int, top_k: int, examples: int = EXAMPLES) -> None:
    """Expand random sequences (new and continued, at right and wrong positions) with random budgets."""
    with grpc.insecure_channel(address) as channel:
        stub = draft_pb2_grpc.DraftServiceStub(channel)

        @settings(FUZZ, max_examples=examples)
        @given(st.data())
        def draft_property(data) -> None:
            sid = f"fuzz-{data.draw(st.integers(0, 2**32))}"
            length = 0  # tokens the draft holds for sid
            created: set[str] = set()
            try:
                for _ in range(data.draw(st.integers(1, 4))):
                    target = data.draw(st.sampled_from([sid, sid, sid, "", "x" * 2000]) | IDS)
                    tokens = data.draw(st.one_of(st.lists(st.integers(0, vocab - 1), max_size=12),
                                                 st.lists(INT32, max_size=4),
                                                 st.lists(st.just(2), min_size=max_context, max_size=max_context + 1)))
                    start = data.draw(st.sampled_from([length, length, 0, length + 1, -1]) | INT32)
                    request = draft_pb2.ExpandRequest(
                        sequences=[draft_pb2.DraftSequence(sequence_id=target, new_tokens=tokens, start_position=start)],
                        budget=data.draw(budgets(top_k)))
                    response, error = one_step(stub.ExpandStream, request)
                    if error is not None:
                        refused_with(*error, "Expand")
                        continue
                    created.add(target)
                    (tree,) = response.trees
                    assert tree.sequence_id == target
                    n = len(tree.tree.tokens)
                    assert n >= 1 and tree.tree.tokens[0] == tokens[-1] and tree.tree.parents[0] == -1
                    assert all(0 <= p < i for i, p in enumerate(tree.tree.parents) if i), list(tree.tree.parents)
                    assert all(0 <= t < vocab for t in tree.tree.tokens)
                    assert np.all(np.isfinite(tree.tree.values))
                    if target == sid:
                        length = start + len(tokens)
            finally:
                if created:
                    stub.Release(draft_pb2.DraftReleaseRequest(sequence_ids=sorted(created)), timeout=30)

        draft_property()


# --- the orchestrator --------------------------------------------------------------------------------------------

def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """Good values nine times in ten: a request with several random fields still often passes validation."""
    return st.integers(0, 9).flatmap(lambda i: bad if i == 0 else good)


def generate_requests() -> st.SearchStrategy[generation_pb2.GenerateRequest]:
    return st.builds(
        generation_pb2.GenerateRequest,
        prompt=mostly(st.one_of(st.text(min_size=1, max_size=60), st.sampled_from(["def f():", "import os\n"])),
                      st.one_of(st.just(""), st.text(min_size=3000, max_size=4000))),
        max_new_tokens=mostly(st.integers(1, 8), st.sampled_from([0, -3, 10**6, 2**31 - 1, -2**31])),
        policy=mostly(st.sampled_from(["", "cast", "eagle2", "chain", "ar"]), st.text(max_size=8)),
        stop=mostly(st.lists(st.text(min_size=1, max_size=6), max_size=4),
                    st.one_of(st.lists(st.text(max_size=3), min_size=17, max_size=30),
                              st.lists(st.text(min_size=600, max_size=700), min_size=1, max_size=1))),
        temperature=mostly(st.sampled_from([0.0, 0.7, 1.0]), FLOATS),
        top_p=mostly(st.sampled_from([0.0, 0.9, 1.0]), FLOATS),
        top_k=mostly(st.integers(0, 50), INT32),
        seed=st.none() | st.integers(0, 2**64 - 1), ignore_eos=st.booleans(), return_step_stats=st.booleans())


def fuzz_orchestrator(address: str, examples: int = EXAMPLES) -> list[str]:
    """Generate and GenerateStream with random fields, some cut short by a deadline or a cancel; returns how each
    call ended."""
    seen: list[str] = []
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        @settings(FUZZ, max_examples=examples)
        @given(generate_requests(), st.sampled_from(["unary", "stream", "cancel", "deadline"]),
               st.floats(0.001, 0.3))
        def generate_property(request, how: str, deadline: float) -> None:
            timeout = deadline if how == "deadline" else 60
            try:
                if how == "unary" or how == "deadline":
                    reply = stub.Generate(request, timeout=timeout)
                    chunks = [reply]
                else:
                    stream = stub.GenerateStream(request, timeout=timeout)
                    chunks = []
                    for chunk in stream:
                        chunks.append(chunk)
                        if how == "cancel":
                            stream.cancel()
                            seen.append("cancelled")
                            return
            except grpc.RpcError as e:
                seen.append(e.code().name)
                if how == "deadline" and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return
                if how == "cancel" and e.code() == grpc.StatusCode.CANCELLED:
                    return
                refused_with(e.code(), e.details() or "", f"Generate({request})")
                return
            seen.append("OK")
            last = chunks[-1]
            assert last.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
            assert 0 < last.usage.completion_tokens <= request.max_new_tokens
            assert sum(len(c.token_ids) for c in chunks) == last.usage.completion_tokens

        generate_property()
    return seen


# --- random bytes as messages -------------------------------------------------------------------------------------

def fuzz_raw_bytes(address: str, methods: dict[str, bool], examples: int = EXAMPLES,
                   on_ok: Callable[[str, bytes], None] = lambda method, payload: None) -> list[str]:
    """Send random bytes as the request of every method (name -> request streaming); returns what each answered.
    Bytes that do not parse are INVALID_ARGUMENT before any handler runs (cast_runtime.serving). `on_ok(method, payload)` runs after
    each call that succeeded (to release what a payload that parsed may have created)."""
    seen: list[str] = []
    with grpc.insecure_channel(address) as channel:
        callables = {m: (channel.stream_stream(m) if streaming else channel.unary_unary(m))  # no (de)serializers
                     for m, streaming in methods.items()}

        @settings(FUZZ, max_examples=examples)
        @given(st.sampled_from(sorted(methods)), st.binary(max_size=300))
        def raw_property(method: str, payload: bytes) -> None:
            try:
                if methods[method]:
                    for _ in callables[method](iter([payload]), timeout=5):
                        pass
                else:
                    callables[method](payload, timeout=5)
                seen.append("OK")
                on_ok(method, payload)
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:  # bytes that parse as a long generation
                    seen.append(code.name)
                    return
                refused_with(code, details, f"{method} with {payload!r}")
                seen.append("unparsable" if "request: not a valid" in details else code.name)

        raw_property()
    return seen
