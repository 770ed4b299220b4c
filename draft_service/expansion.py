"""Tree expansion on the draft model: the domain of the draft service (numpy + runner, no gRPC).

Per sequence the draft keeps a KV cache of every committed token it has seen. One Expand call, for a batch:

1. Commit: forward each sequence's new tokens (causal) on top of its cache and append their KV for good.
   The last new token is the tree's root (node 0); its top-K are the candidates of layer 1.
2. Expand, EAGLE-2 style: each layer keeps its best candidates by value (`layer_keep_count`); if another layer
   is wanted (`expand_another_layer`), one forward over the kept nodes, with a tree mask, gives each of them
   top_k children: the next layer's candidates, value = parent value * draft probability.
3. Return every candidate of every layer (kept or not): the orchestrator reranks. The tree's KV was temporary:
   only the committed tokens stay in the cache.

Those two functions are where CAST's breadth (C1) and depth (C2) pruning plug in (issue 4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cast_core.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, ResourceExhausted
from cast_core.sessions import SessionStore
from cast_core.tree import TokenTree
from draft_service.runner import DraftRunner

# Column kinds of the batched KV while expanding (tree nodes use their index >= 0).
VISIBLE = -1  # a committed token of the sequence: every node sees it
HIDDEN = -2   # padding between sequences of different lengths: nobody sees it


@dataclass(frozen=True)
class CastBudget:
    """CAST's pruning inputs, as the orchestrator sends them (see ExpandBudget.cast in draft.proto)."""

    node_buckets: np.ndarray     # [R] int
    token_counts: np.ndarray     # [C] int
    normalized_cost: np.ndarray  # [R, C] draft cost / verifier one-token cost
    breadth_threshold: float     # C1
    depth_threshold: float       # C2
    gain_mean: float             # alpha


@dataclass(frozen=True)
class Budget:
    top_k: int                      # children proposed by each kept node
    max_depth: int                  # layers of candidates at most
    max_breadth: int                # nodes kept per layer at most
    cast: CastBudget | None = None  # set: prune by CAST within the limits above (issue 4)


@dataclass(frozen=True)
class SequenceInput:
    sequence_id: str
    new_tokens: np.ndarray  # [n] int64, committed since the last call
    start_position: int     # position of new_tokens[0]


@dataclass(frozen=True)
class LayerStats:
    candidates: int  # nodes proposed in this layer
    kept: int        # of them, the nodes that proposed children (0 for the last layer)


@dataclass
class Expansion:
    sequence_id: str
    tree: TokenTree
    layers: list[LayerStats]


@dataclass
class DraftSession:
    """The committed tokens' KV of one sequence; arrays grow by doubling, `length` columns are valid."""

    keys: list[np.ndarray]    # per layer [Hkv, capacity, D]
    values: list[np.ndarray]
    length: int = 0

    def append(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Append n columns: per layer [Hkv, n, D]."""
        end = self.length + keys[0].shape[1]
        if end > self.keys[0].shape[1]:
            capacity = max(end, 2 * self.keys[0].shape[1])
            self.keys = [_grown(a, self.length, capacity) for a in self.keys]
            self.values = [_grown(a, self.length, capacity) for a in self.values]
        for cache, new in zip(self.keys + self.values, keys + values):
            cache[:, self.length : end] = new
        self.length = end


def _grown(cache: np.ndarray, length: int, capacity: int) -> np.ndarray:
    out = np.empty((cache.shape[0], capacity, cache.shape[2]), dtype=cache.dtype)  # [Hkv, capacity, D]
    out[:, :length] = cache[:, :length]
    return out


# --- the two decisions that CAST replaces -------------------------------------------------------------------


def layer_keep_count(layer_values: list[np.ndarray], budget: Budget, nodes_so_far: int) -> int:
    """How many candidates of the current layer each sequence keeps (the kept ones propose children).

    layer_values: per sequence, its candidates' values sorted descending. nodes_so_far: tree nodes forwarded
    so far in this call, the draft cost table's row. EAGLE-2: a fixed max_breadth.
    Issue 4: with budget.cast set, CAST's breadth rule (C1) on the batch-average cumulative value.
    """
    return budget.max_breadth


def expand_another_layer(depth: int, kept_values: list[np.ndarray], budget: Budget, nodes_so_far: int) -> bool:
    """Whether the kept nodes of layer `depth` propose children (layer depth + 1).

    kept_values: per sequence, the kept nodes' values sorted descending. EAGLE-2: up to max_depth layers.
    Issue 4: with budget.cast set, also CAST's depth rule (C2): alpha * u / c >= C2.
    """
    return depth < budget.max_depth


# --- the expander -------------------------------------------------------------------------------------------


@dataclass
class _Tree:
    """A tree being grown: flat lists, and per node the list of its ancestors (itself included)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    lineage: list[list[int]] = field(default_factory=list)

    def add(self, token: int, parent: int, value: float) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1 if parent >= 0 else 0)
        self.values.append(value)
        self.lineage.append((self.lineage[parent] if parent >= 0 else []) + [len(self.tokens) - 1])
        return len(self.tokens) - 1

    def to_token_tree(self) -> TokenTree:
        return TokenTree(
            tokens=np.asarray(self.tokens, dtype=np.int64),
            parents=np.asarray(self.parents, dtype=np.int64),
            depths=np.asarray(self.depths, dtype=np.int64),
            values=np.asarray(self.values, dtype=np.float32),
        )


class Expander:
    """Owns the sessions and the runner; all calls come from one thread (the servicer's executor)."""

    def __init__(self, runner: DraftRunner, sessions: SessionStore[DraftSession], max_context: int) -> None:
        self.runner = runner
        self.sessions = sessions
        self.max_context = max_context
        self.model_seconds = 0.0  # time inside runner.run during the current call

    # public API

    def expand(self, sequences: list[SequenceInput], budget: Budget) -> tuple[list[Expansion], float]:
        """Commit each sequence's new tokens and expand its tree. Returns the trees and the model time (s).

        The whole request is validated before anything changes: an error leaves every session as it was.
        """
        self.validate_budget(budget)
        sessions = self.validate_sequences(sequences)
        self.model_seconds = 0.0
        if not sequences:
            return [], 0.0
        sessions = [s if s is not None else self.sessions.create(q.sequence_id, self.new_session())
                    for q, s in zip(sequences, sessions)]
        root_probs, root_ids, past, columns = self.commit(sequences, sessions)
        trees, stats = self.grow_trees(sequences, budget, root_probs, root_ids, past, columns)
        out = [Expansion(q.sequence_id, t.to_token_tree(), s) for q, t, s in zip(sequences, trees, stats)]
        return out, self.model_seconds

    def release(self, sequence_ids: list[str]) -> int:
        return self.sessions.release(sequence_ids)

    def expire(self) -> list[str]:
        return self.sessions.expire()

    def new_session(self) -> DraftSession:
        n = self.runner.meta.num_layers
        return DraftSession(keys=[self.runner.empty_kv(16) for _ in range(n)],
                            values=[self.runner.empty_kv(16) for _ in range(n)])

    # validation

    def validate_budget(self, budget: Budget) -> None:
        k = self.runner.meta.top_k
        if not 1 <= budget.top_k <= k:
            raise InvalidArgument(f"{budget.top_k} is outside [1, {k}] (the draft was exported with top-{k})",
                                  "budget.top_k")
        if budget.max_depth < 0:
            raise InvalidArgument(f"{budget.max_depth} must be >= 0", "budget.max_depth")
        if budget.max_breadth < 1:
            raise InvalidArgument(f"{budget.max_breadth} must be >= 1", "budget.max_breadth")

    def validate_sequences(self, sequences: list[SequenceInput]) -> list[DraftSession | None]:
        """Check every sequence against the request and the cache; the session of each (None: to create)."""
        vocab = self.runner.meta.vocab_size
        seen: set[str] = set()
        found: list[DraftSession | None] = []
        for i, q in enumerate(sequences):
            f = f"sequences[{i}]"
            if not q.sequence_id:
                raise InvalidArgument("must not be empty", f"{f}.sequence_id")
            if q.sequence_id in seen:
                raise InvalidArgument(f"{q.sequence_id!r} appears twice in one request", f"{f}.sequence_id")
            seen.add(q.sequence_id)
            if q.new_tokens.size == 0:
                raise InvalidArgument("must not be empty: the last new token is the tree's root", f"{f}.new_tokens")
            bad = np.nonzero((q.new_tokens < 0) | (q.new_tokens >= vocab))[0]
            if bad.size:
                j = int(bad[0])
                raise InvalidArgument(f"token {int(q.new_tokens[j])} is outside the vocabulary [0, {vocab})",
                                      f"{f}.new_tokens[{j}]")
            if q.start_position < 0:
                raise InvalidArgument(f"{q.start_position} must be >= 0", f"{f}.start_position")
            end = q.start_position + q.new_tokens.size
            if end > self.max_context:
                raise OutOfRange(f"the sequence would hold {end} tokens, the context is {self.max_context}",
                                 f"{f}.new_tokens")
            if q.sequence_id in self.sessions:
                session = self.sessions.get(q.sequence_id)
                if q.start_position != session.length:
                    raise FailedPrecondition(
                        f"{q.start_position} does not match the {session.length} tokens cached for "
                        f"{q.sequence_id!r}", f"{f}.start_position")
                found.append(session)
            elif q.start_position > 0:
                raise NotFound(f"unknown sequence {q.sequence_id!r} (never created, released or expired): "
                               "send the whole sequence with start_position 0", f"{f}.sequence_id")
            else:
                found.append(None)
        new = [i for i, s in enumerate(found) if s is None]
        if new and len(self.sessions) + len(new) > self.sessions.max_sessions:
            self.sessions.expire()
            room = self.sessions.max_sessions - len(self.sessions)
            if len(new) > room:  # name the first sequence that does not fit
                raise ResourceExhausted(f"{self.sessions.max_sessions} live sequences: no room for another",
                                        f"sequences[{new[room]}].sequence_id")
        return found

    # model work

    def run(self, input_ids, position_ids, mask, past_keys, past_values):
        t0 = time.perf_counter()
        out = self.runner.run(input_ids, position_ids, mask, past_keys, past_values)
        self.model_seconds += time.perf_counter() - t0
        return out

    def commit(self, sequences: list[SequenceInput], sessions: list[DraftSession]):
        """Forward the new tokens of every sequence (batched, padded) and append their KV to the sessions.

        Returns the root's top-K per sequence ([B, K] each), and the batched KV and its column kinds, on top
        of which the tree layers are forwarded.
        """
        B = len(sequences)
        lens = [q.new_tokens.size for q in sequences]
        olds = [s.length for s in sessions]
        T, P = max(lens), max(olds)
        meta = self.runner.meta
        input_ids = np.zeros((B, T), dtype=np.int64)                         # [B, T]
        position_ids = np.zeros((B, T), dtype=np.int64)                      # [B, T]
        visible = np.zeros((B, T, P + T), dtype=bool)                        # [B, T, P+T]
        past_k = [np.zeros((B, meta.num_kv_heads, P, meta.head_dim), self.runner.dtype) for _ in sessions[0].keys]
        past_v = [np.zeros_like(a) for a in past_k]                          # per layer [B, Hkv, P, D]
        columns = np.full((B, P + T), HIDDEN, dtype=np.int64)                # [B, P+T]
        causal = np.tril(np.ones((T, T), dtype=bool))
        for b, (q, s, n, p) in enumerate(zip(sequences, sessions, lens, olds)):
            input_ids[b, :n] = q.new_tokens
            position_ids[b] = q.start_position + np.arange(T)  # padding rows: any position, their output is dropped
            visible[b, :, :p] = True
            visible[b, :, P : P + T] = causal
            visible[b, n:] = False  # padding rows see only themselves
            visible[b, np.arange(n, T), P + np.arange(n, T)] = True
            columns[b, :p] = VISIBLE
            columns[b, P : P + n] = VISIBLE
            for l in range(len(past_k)):
                past_k[l][b, :, :p] = s.keys[l][:, :p]
                past_v[l][b, :, :p] = s.values[l][:, :p]
        out = self.run(input_ids, position_ids, self.additive(visible), past_k, past_v)
        for b, (s, n) in enumerate(zip(sessions, lens)):
            s.append([k[b, :, P : P + n] for k in out.keys], [v[b, :, P : P + n] for v in out.values])
        last = np.asarray(lens) - 1
        return out.probs[np.arange(B), last], out.ids[np.arange(B), last], (out.keys, out.values), columns

    def grow_trees(self, sequences, budget: Budget, root_probs, root_ids, past, columns):
        """Layer by layer: keep the best candidates, forward them with a tree mask, collect their children."""
        B = len(sequences)
        k = budget.top_k
        roots = [q.start_position + q.new_tokens.size - 1 for q in sequences]
        # Tree positions stop at the context's end: a sequence near it gets a shallower tree, not an error.
        depth_room = [min(budget.max_depth, self.max_context - 1 - r) for r in roots]
        trees = [_Tree() for _ in range(B)]
        stats: list[list[LayerStats]] = [[] for _ in range(B)]
        layer: list[list[int]] = []  # per sequence: node indices of the current layer's candidates
        for b, tree in enumerate(trees):
            tree.add(int(sequences[b].new_tokens[-1]), -1, 1.0)
            layer.append([tree.add(int(t), 0, float(p)) for t, p in zip(root_ids[b, :k], root_probs[b, :k])]
                         if depth_room[b] >= 1 else [])
        keys, values = past
        forwarded = 0
        depth = 1
        while any(layer):
            # Candidates by value, best first (stable: ties keep tree order).
            ranked = [sorted(nodes, key=lambda i, t=t: -t.values[i]) for nodes, t in zip(layer, trees)]
            n_keep = layer_keep_count([np.array([t.values[i] for i in r], np.float32) for r, t in zip(ranked, trees)],
                                      budget, forwarded)
            kept = [r[:n_keep] if depth < depth_room[b] else [] for b, r in enumerate(ranked)]
            kept_values = [np.array([t.values[i] for i in kp], np.float32) for kp, t in zip(kept, trees)]
            if not any(kept) or not expand_another_layer(depth, kept_values, budget, forwarded):
                kept = [[] for _ in range(B)]
            for b in range(B):
                if layer[b]:
                    stats[b].append(LayerStats(candidates=len(layer[b]), kept=len(kept[b])))
            if not any(kept):
                break
            out, columns = self.forward_layer(sequences, trees, kept, roots, keys, values, columns)
            keys, values = out.keys, out.values
            forwarded += sum(len(kp) for kp in kept)
            layer = []
            for b, (tree, nodes) in enumerate(zip(trees, kept)):
                children = []
                for j, node in enumerate(nodes):
                    for t, p in zip(out.ids[b, j, :k], out.probs[b, j, :k]):
                        children.append(tree.add(int(t), node, float(np.float32(tree.values[node]) * p)))
                layer.append(children)
            depth += 1
        return trees, stats

    def forward_layer(self, sequences, trees, kept, roots, keys, values, columns):
        """One forward over the kept nodes of every sequence, on top of the batched KV (committed + tree so far).

        A node sees the committed tokens, its ancestors in the tree and itself. Position = root position + depth.
        """
        B, L = columns.shape
        N = max(len(kp) for kp in kept)
        input_ids = np.zeros((B, N), dtype=np.int64)                     # [B, N]
        position_ids = np.zeros((B, N), dtype=np.int64)                  # [B, N]
        new_columns = np.full((B, N), HIDDEN, dtype=np.int64)            # [B, N]
        for b, (tree, nodes) in enumerate(zip(trees, kept)):
            input_ids[b, : len(nodes)] = [tree.tokens[i] for i in nodes]
            position_ids[b, : len(nodes)] = [roots[b] + tree.depths[i] for i in nodes]
            new_columns[b, : len(nodes)] = nodes
        all_columns = np.concatenate([columns, new_columns], axis=1)     # [B, L+N]
        visible = np.zeros((B, N, L + N), dtype=bool)                    # [B, N, L+N]
        for b, (tree, nodes) in enumerate(zip(trees, kept)):
            for j, node in enumerate(nodes):
                visible[b, j] = (all_columns[b] == VISIBLE) | np.isin(all_columns[b], tree.lineage[node])
            visible[b, np.arange(len(nodes), N), L + np.arange(len(nodes), N)] = True  # padding rows: themselves
        out = self.run(input_ids, position_ids, self.additive(visible), keys, values)
        return out, all_columns

    def additive(self, visible: np.ndarray) -> np.ndarray:
        """[B, T, S] bool -> [B, 1, T, S] additive mask in the model's dtype."""
        mask = np.where(visible, 0.0, self.runner.mask_min).astype(self.runner.dtype)
        return mask[:, None]
