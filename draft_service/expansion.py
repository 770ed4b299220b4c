"""Tree expansion on the draft model: the domain of the draft service (numpy + runner, no gRPC).

Per sequence the draft keeps a KV cache of every committed token it has seen. One Expand call, for a batch:

1. Commit: forward each sequence's new tokens (causal) on top of its cache and append their KV for good.
   The last new token is the tree's root (node 0); its top-K are the candidates of layer 1. A start position
   before the cache's end rewinds it there first (a prepared branch the verifier did not take). A prepared Expand
   (`predict_root`) commits one more token, the draft's own top-1 after the new ones, and roots the tree there.
2. Expand, EAGLE-2 style: each layer keeps its best candidates by value (`layer_keep_count`); if another layer
   is wanted (`expand_another_layer`), one forward over the kept nodes, with a tree mask, gives each of them
   top_k children: the next layer's candidates, value = parent value * draft probability.
   CAST also drops, as it is proposed, every candidate below the value of the `max_returned_nodes`-th best node
   proposed so far: the trimming in 3 would drop it and all its descendants, so ranking, keeping or expanding it
   is wasted draft work (the planner sets that bound from the counts its reranking verified lately). The trees
   returned are the same as with every candidate kept until 3 (`_Trees`); `expanded_nodes` and each layer's
   `candidates` still count every node proposed.
   CAST ranks and weighs nodes by their calibrated value (the orchestrator's measured accepted tokens per unit of
   value at the node's depth, never above the parent's: selection.calibrated_values), the returned trees' values
   stay the draft's own.
3. Return every candidate of every layer (kept or not; or the best `max_returned_nodes` by value): the
   orchestrator reranks. The tree's KV was temporary: only the committed tokens stay in the cache.

Those two functions are where CAST's breadth (C1) and depth (C2) pruning plug in.

The KV lives in rows of the runner's buffers (kv.py, runner.py): only the top-K of each forward come back to the
host. The batch's trees grow together, one block of [B, width] arrays per layer (`_Trees`): a layer costs a few
numpy calls for all of them, not a few per sequence (reports/cast-overhead/: per Expand at batch 8, 3.1 ms of
per-sequence bookkeeping became 1.6 ms; at batch 32, 10.6 ms became 3.1 ms).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cast_core.cost_table import NormalizedCostSlice
from cast_core.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, ResourceExhausted
from cast_core.selection import breadth_keep, depth_scale, should_expand, sibling_scale
from cast_core.tree import TokenTree
from cast_runtime.sessions import SessionStore
from draft_service.kv import BufferKV
from draft_service.runner import DraftRunner


@dataclass(frozen=True)
class CastBudget:
    """CAST's pruning inputs, as the orchestrator sends them (see ExpandBudget.cast in draft.proto)."""

    prices: NormalizedCostSlice  # draft forward cost / verifier one-token cost, by (nodes so far, new tokens)
    breadth_threshold: float     # C1
    depth_threshold: float       # C2
    gain_mean: float             # alpha
    step_base_cost: float = 0.0  # a drafted step's cost before any layer (same unit as prices); 0: C2 alone
    depth_scales: tuple[float, ...] = ()  # accepted tokens per unit of node value, per depth (d-1); (): 1
    sibling_scales: tuple[float, ...] = ()  # set: depth_scales is for top-1 children, these for the others

    def scale(self, depth: int) -> float:
        """Accepted tokens per unit of value at `depth` (the last scale past the end): a top-1 child's."""
        return depth_scale(self.depth_scales, depth)

    def sibling_scale(self, depth: int) -> float:
        """The same for a child that is not its parent's top-1 (selection.sibling_scale)."""
        return sibling_scale(self.depth_scales, self.sibling_scales, depth)


@dataclass(frozen=True)
class Budget:
    top_k: int                      # children proposed by each kept node
    max_depth: int                  # layers of candidates at most
    max_breadth: int                # nodes kept per layer at most
    cast: CastBudget | None = None  # set: prune by CAST within the limits above
    max_returned_nodes: int = 0     # > 0: each tree is trimmed to its best nodes by value, at most this many


@dataclass(frozen=True)
class SequenceInput:
    sequence_id: str
    new_tokens: np.ndarray  # [n] int64, committed since the last call
    start_position: int     # position of new_tokens[0]; before the cached length: rewind there
    predict_root: bool = False  # the root is the draft's top-1 after new_tokens, committed too


@dataclass(frozen=True)
class LayerStats:
    candidates: int  # nodes proposed in this layer
    kept: int        # of them, the nodes that proposed children (0 for the last layer)


@dataclass
class Expansion:
    sequence_id: str
    tree: TokenTree                # trimmed to budget.max_returned_nodes when that is set
    layers: list[LayerStats]
    layer_utilities: list[float]   # u^(i) per layer, of the whole expansion (kept_layer_utilities); 0s without CAST
    expanded_nodes: int            # nodes expanded, root included, before trimming


@dataclass
class DraftSession:
    """One sequence's committed token ids; their KV lives in a buffer row (kv.py), recomputed from these when lost."""

    length: int = 0
    tokens: list[int] = field(default_factory=list)


# --- the two decisions that CAST replaces -------------------------------------------------------------------


def layer_keep_count(layer_values: list[np.ndarray] | np.ndarray, budget: Budget, nodes_so_far: int) -> int:
    """How many candidates of the current layer each sequence keeps (the kept ones propose children).

    layer_values: per sequence, its candidates' (calibrated) values sorted descending (or [B, n], 0 past a sequence's
    candidates). nodes_so_far: tree nodes forwarded so far in this call, the row of the draft's cost slice.
    EAGLE-2: a fixed max_breadth. CAST: the breadth rule (C1) on the batch-average cumulative value against the cost
    of forwarding k nodes, within max_breadth.
    """
    if budget.cast is None:
        return budget.max_breadth
    if isinstance(layer_values, np.ndarray):  # [B, n], padded with 0: one array for the batch
        values = layer_values[:, : budget.max_breadth]
        widest = values.shape[1]
    else:
        values = [v[: budget.max_breadth] for v in layer_values]
        widest = max((v.size for v in values), default=0)
    if widest == 0:
        return budget.max_breadth
    costs = budget.cast.prices.costs_for_counts(nodes_so_far, widest)
    return breadth_keep(values, costs, budget.cast.breadth_threshold)


def expand_another_layer(depth: int, kept: int, utility: float, budget: Budget, nodes_so_far: int,
                         tree_so_far: tuple[float, float] = (1.0, 0.0), top_share: float = 1.0) -> bool:
    """Whether the kept nodes of layer `depth` propose children (layer depth + 1).

    kept: the most nodes a sequence kept at this layer; utility: their batch-average summed value u (layer_utility,
    the draft's own values: the gain buffer's alpha = u^(i+1) / u^(i) is learned on those).
    EAGLE-2: up to max_depth layers. CAST: also the depth rule (C2), s_(i+1) * alpha * u / c >= C2, where c is the
    cost of the forward that would expand them and s_(i+1) the measured tokens per unit of value at the next depth
    (the paper's alpha * u / c, in expected tokens: with one scale for all depths, deep layers were undervalued and
    C2 stopped trees early, reports/cast-vs-fixed/). With a step base cost, also the efficiency rule: the next
    layer's expected tokens per unit of cost, s_(i+1) * alpha * u / c, must reach the tree's so far, U / C
    (tree_so_far = (U, C): expected tokens of the tree up to this layer, the step's cost before this forward).
    C2 alone keeps a layer that beats a plain decoding step yet lowers the step's tokens per millisecond, which
    matters where a draft layer costs a fair share of a verify step. With sibling scales, s_(i+1) mixes the next
    depth's top-1 and sibling scales by top_share, the share of u in top-1 children (the next layer's mix is
    unknown before its forward; this layer's is the nearest measure).
    """
    if depth >= budget.max_depth:
        return False
    if budget.cast is None:
        return True
    if kept == 0:
        return False
    cast = budget.cast
    cost = cast.prices.cost(nodes_so_far, kept)
    scale = cast.scale(depth + 1)
    if cast.sibling_scales:
        scale = top_share * scale + (1 - top_share) * cast.sibling_scale(depth + 1)
    expected = scale * utility  # in expected tokens, at the next layer's calibration
    if not should_expand(cast.gain_mean, expected, cost, cast.depth_threshold):
        return False
    tokens, spent = tree_so_far
    if cast.step_base_cost <= 0 or spent <= 0 or cost <= 0:
        return True
    return cast.gain_mean * expected / cost >= tokens / spent


# --- the expander -------------------------------------------------------------------------------------------


def max_tree_nodes(budget: Budget) -> int:
    """The most nodes a tree of this budget can hold: layer 1 has top_k, layer d+1 top_k per kept node of d."""
    nodes, layer = 1, budget.top_k if budget.max_depth else 0
    for _ in range(budget.max_depth):
        nodes += layer
        layer = min(layer, budget.max_breadth) * budget.top_k
    return nodes


class _Trees:
    """The B trees of one Expand, grown together one layer at a time. Layer d is a block of [B, w] arrays, one row
    per tree: the children that the tree's kept nodes of layer d - 1 proposed, k each, in the order those were kept
    (so a node's parent is the (slot // k)-th node its layer above kept). Nothing is copied into per-node arrays while
    the trees grow: a layer costs a few numpy calls for the whole batch, not a few per sequence, and the trees are
    assembled once, at the end (`trimmed`). keys: each node's calibrated value, what ranks it
    (selection.calibrated_values, computed layer by layer; the values themselves without CAST); -inf in a slot that
    holds no node (a parent past its row's count, or a child dropped). top (with sibling scales): whether each node
    of the current layer is its parent's top child (selection.top_children: the highest value, the first among
    equals), which takes the top-1 scale where the others take the sibling scale.

    keep_best > 0 (CAST, whose trees are returned trimmed to their best keep_best nodes): a child whose key is below
    the keep_best-th best key proposed so far is dropped at once. Keys never increase from parent to child, and that
    bound only rises, so neither the child nor any of its descendants could be among the best keep_best at the end;
    the nodes held keep their order (ties go by it), so the trimmed trees are the same as with every child kept.
    """

    def __init__(self, roots: np.ndarray, keep_best: int = 0) -> None:
        B = roots.shape[0]
        self.row_starts = np.arange(B)[:, None]  # times a layer's width: each row's first entry, flattened
        # Per layer (the roots' first): tokens, values (float32), keys (float64), the parent's column (its layer's
        # first column in the trees assembled by `trimmed`, plus its slot).
        self.tokens = [roots.astype(np.int64)[:, None]]
        self.values = [np.ones((B, 1), dtype=np.float32)]
        self.keys = [np.ones((B, 1))]
        self.parents = [np.full((B, 1), -1, dtype=np.int64)]
        self.top: np.ndarray | None = None  # [B, w] the current layer's, where children take sibling scales
        self.start, self.columns = 0, 1  # the current layer's first column; all layers' columns
        self.counts = np.ones(B, dtype=np.int64)    # nodes held in the current layer per tree
        self.proposed = np.ones(B, dtype=np.int64)  # nodes proposed, root included: the dropped ones too
        self.keep_best = keep_best
        self.best: np.ndarray | None = None  # [B, keep_best] the best keys proposed, once a tree had more

    def add_children(self, kept: np.ndarray, counts: np.ndarray, tokens: np.ndarray, probs: np.ndarray,
                     scale: float = 1.0, ragged: bool = True, sibling: float | None = None) -> np.ndarray:
        """kept [B, N]: the slots of the current layer's nodes that proposed children, the first counts[b] of row b
        (ragged False: every row's N); tokens, probs [B, N, k]: their top-k (all their children); scale: the
        calibration at the children's depth, of top children; sibling: of the others (None: scale). The children
        become the current layer. Returns how many children each tree was proposed, [B] (some dropped where
        keep_best is set)."""
        B, N, k = tokens.shape
        proposed = counts * k
        self.proposed += proposed
        flat = kept + self.row_starts * self.keys[-1].shape[1]  # the parents' entries in the flattened layer
        # float32 product of a value and a probability <= 1: never above the parent's value.
        values = self.values[-1].reshape(-1)[flat][:, :, None] * probs  # [B, N, k]
        scales, top = scale, None
        if sibling is not None:
            top = np.zeros((B, N, k), dtype=bool)
            np.put_along_axis(top, np.argmax(values, axis=2)[:, :, None], True, axis=2)  # the first of the highest
            scales = np.where(top, scale, sibling)
        keys = np.minimum(self.keys[-1].reshape(-1)[flat][:, :, None], scales * values.astype(np.float64))
        values, keys = values.reshape(B, N * k), keys.reshape(B, N * k)
        held = None  # every slot holds a child
        if ragged:  # past a row's count: no parent, no children
            held = np.arange(N * k) < proposed[:, None]
            keys[~held] = -np.inf
        m = self.keep_best
        if m and int(self.proposed.max()) > m:
            if self.best is None:  # nothing was dropped yet: the best so far are the best of every layer
                pool = np.concatenate([*self.keys, np.full((B, m), -np.inf)], axis=1)
                self.best = np.partition(pool, -m, axis=1)[:, -m:]
            pool = np.partition(np.concatenate([self.best, keys], axis=1), -m, axis=1)
            self.best = pool[:, -m:]
            # At or above the m-th best key proposed so far (with fewer than m, the -inf padding: all are).
            above = keys >= self.best[:, :1]
            held = above if held is None else held & above
            keys[~held] = -np.inf
        self.tokens.append(tokens.reshape(B, N * k))
        self.values.append(values)
        self.keys.append(keys)
        self.parents.append(np.repeat(kept + self.start, k, axis=1))
        self.top = None if top is None else top.reshape(B, N * k)
        self.start, self.columns = self.columns, self.columns + N * k
        self.counts = proposed if held is None else held.sum(axis=1)
        return proposed

    def ranked_layer(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The current layer's nodes per tree, best key first (stable: ties keep their order, so a parent beats an
        equal child): their slots [B, M] and keys [B, M] (0 past a tree's count), and the counts [B]."""
        keys = self.keys[-1]
        order = np.argsort(-keys, axis=1, kind="stable")[:, : int(self.counts.max())]
        return order, np.maximum(self.gather(keys, order), 0.0), self.counts

    def gather(self, layer: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """layer [B, w] read at slots [B, n]: row b's entries slots[b] ([B, n])."""
        return layer.reshape(-1)[slots + self.row_starts * layer.shape[1]]

    def entries(self, slots: np.ndarray) -> np.ndarray:
        """slots [B, n] of the current layer as entries of its flattened arrays (gather's index, for several reads)."""
        return slots + self.row_starts * self.keys[-1].shape[1]

    def trimmed(self, keep: int = 0) -> list[TokenTree]:
        """Each tree, in tree order (layer by layer, each in the order its nodes were proposed), trimmed to its root
        and its best `keep` - 1 other nodes by key where keep > 0 (TokenTree.top_m's choice: ties go to the earlier
        node)."""
        keys = np.concatenate(self.keys, axis=1)  # [B, T]: every layer's columns
        B, T = keys.shape
        n = np.count_nonzero(keys > -np.inf, axis=1)  # nodes held
        keep = min(keep, T) if keep > 0 else T
        count = np.minimum(n, keep)
        keys[:, 0] = np.inf  # the root first
        chosen = np.argsort(-keys, axis=1, kind="stable")[:, :keep]  # no node (-inf) last
        taken = np.arange(keep) < count[:, None]
        chosen = np.sort(np.where(taken, chosen, T), axis=1)  # tree order; past a tree's count: last
        chosen = np.where(taken, chosen, 0)
        rows = self.row_starts * T
        new_index = np.full(B * T, -1, dtype=np.int64)
        new_index[(chosen + rows)[taken]] = np.nonzero(taken)[1]
        parents = self.gather(np.concatenate(self.parents, axis=1), chosen)
        parents = np.where(parents >= 0, new_index[np.maximum(parents, 0) + rows], -1)
        if (taken[:, 1:] & (parents[:, 1:] < 0)).any():
            raise ValueError("trimmed: the kept nodes are not closed under ancestors")
        tokens = self.gather(np.concatenate(self.tokens, axis=1), chosen)
        values = self.gather(np.concatenate(self.values, axis=1), chosen)
        depths = np.repeat(np.arange(len(self.keys)), [keys.shape[1] for keys in self.keys])[chosen]
        return [TokenTree(tokens[b, :c], parents[b, :c], depths[b, :c], values[b, :c])
                for b, c in enumerate(count.tolist())]


def row_sums(values: np.ndarray, counts: np.ndarray) -> list[float]:
    """Per row b of values [B, n], the float64 sum of its first counts[b] entries: numpy's sum of each as an array
    of its own (selection.layer_sums' numbers, bit for bit), in one call per distinct count."""
    values = values.astype(np.float64)
    if values.shape[0] == 1:  # batch 1: the one row's first counts[0]
        return [float(values[0, : int(counts[0])].sum())]
    distinct = set(counts.tolist())
    if len(distinct) == 1:  # the usual case
        c = distinct.pop()
        return values[:, :c].sum(axis=1).tolist() if c else [0.0] * values.shape[0]
    sums = np.zeros(values.shape[0])
    for c in distinct:
        if c:
            rows = counts == c
            sums[rows] = values[rows, :c].sum(axis=1)
    return sums.tolist()


def check_sequences(sequences: list[SequenceInput], vocab_size: int, max_context: int, sessions: SessionStore,
                    cached_length) -> list:
    """A request's sequences checked against the request, the vocabulary, the context and the cached sessions
    (cached_length(session): the tokens it holds); the cached session of each (None: one to create). Raises a
    CastError naming the field. Shared by the single-draft Expander and the draft levels (levels.py)."""
    seen: set[str] = set()
    found: list = []
    for i, q in enumerate(sequences):
        f = f"sequences[{i}]"
        if not q.sequence_id:
            raise InvalidArgument("must not be empty", f"{f}.sequence_id")
        if q.sequence_id in seen:
            raise InvalidArgument(f"{q.sequence_id!r} appears twice in one request", f"{f}.sequence_id")
        seen.add(q.sequence_id)
        if q.new_tokens.size == 0:
            raise InvalidArgument("must not be empty: the last new token is the tree's root", f"{f}.new_tokens")
        bad = np.nonzero((q.new_tokens < 0) | (q.new_tokens >= vocab_size))[0]
        if bad.size:
            j = int(bad[0])
            raise InvalidArgument(f"token {int(q.new_tokens[j])} is outside the vocabulary [0, {vocab_size})",
                                  f"{f}.new_tokens[{j}]")
        if q.start_position < 0:
            raise InvalidArgument(f"{q.start_position} must be >= 0", f"{f}.start_position")
        end = q.start_position + q.new_tokens.size + q.predict_root
        if end > max_context:
            raise OutOfRange(f"the sequence would hold {end} tokens, the context is {max_context}", f"{f}.new_tokens")
        if q.sequence_id in sessions:
            session = sessions.get(q.sequence_id)
            if q.start_position > cached_length(session):
                raise FailedPrecondition(f"{q.start_position} is past the {cached_length(session)} tokens cached "
                                         f"for {q.sequence_id!r}", f"{f}.start_position")
            found.append(session)
        elif q.start_position > 0:
            raise NotFound(f"unknown sequence {q.sequence_id!r} (never created, released or expired): "
                           "send the whole sequence with start_position 0", f"{f}.sequence_id")
        else:
            found.append(None)
    new = [i for i, s in enumerate(found) if s is None]
    if new and len(sessions) + len(new) > sessions.max_sessions:
        sessions.expire()
        room = sessions.max_sessions - len(sessions)
        if len(new) > room:  # name the first sequence that does not fit
            raise ResourceExhausted(f"{sessions.max_sessions} live sequences: no room for another",
                                    f"sequences[{new[room]}].sequence_id")
    return found


class Expander:
    """Owns the sessions and the runner; all calls come from one thread (the servicer's executor)."""

    def __init__(self, runner: DraftRunner, sessions: SessionStore[DraftSession], max_context: int,
                 max_nodes: int = 4096, max_depth: int = 64) -> None:
        self.runner = runner
        self.sessions = sessions
        self.max_context = max_context
        # Per tree: bound the work and memory that one request can ask for.
        self.max_nodes = max_nodes
        self.max_depth = max_depth
        self.kv = BufferKV(runner, max_context, max_depth)

    # public API

    def expand(self, sequences: list[SequenceInput], budget: Budget) -> tuple[list[Expansion], float]:
        """Commit each sequence's new tokens and expand its tree. Returns the trees and the model time (s).

        The whole request is validated before anything changes: an error leaves every session as it was.
        """
        self.validate_budget(budget)
        sessions = self.validate_sequences(sequences)
        self.kv.model_seconds = 0.0
        if not sequences:
            return [], 0.0
        sessions = [s if s is not None else self.sessions.create(q.sequence_id, DraftSession())
                    for q, s in zip(sequences, sessions)]
        for q, s in zip(sequences, sessions):
            if q.start_position < s.length:
                self.rewind_session(s, q.start_position)
        # A tree forwards at most max_breadth nodes in each of its layers but the last.
        tree_room = max(budget.max_depth - 1, 0) * budget.max_breadth
        root_probs, root_ids = self.kv.commit(sequences, sessions, tree_room)
        if any(q.predict_root for q in sequences):
            sequences, root_probs, root_ids = self.commit_predicted_roots(sequences, sessions, root_ids, tree_room)
        trees, stats, utilities, proposed = self.grow_trees(sequences, budget, root_probs, root_ids)
        out = [Expansion(q.sequence_id, t, s, u, n)
               for q, t, s, u, n in zip(sequences, trees, stats, utilities, proposed)]
        return out, self.kv.model_seconds

    def commit_predicted_roots(self, sequences, sessions, root_ids, tree_room: int):
        """Commit each predict_root sequence's top-1 next token (its tree's root); the others commit their last new
        token again (rewound by one), so that one batched forward of one token serves them all. Returns the sequences
        as the trees see them (new_tokens ending with their roots) and the roots' top-K, [B, K] each."""
        again = []
        for q, s, ids in zip(sequences, sessions, root_ids):
            if q.predict_root:
                again.append(SequenceInput(q.sequence_id, ids[:1].astype(np.int64), s.length))
            else:
                self.rewind_session(s, s.length - 1)
                again.append(SequenceInput(q.sequence_id, q.new_tokens[-1:], s.length))
        root_probs, root_ids = self.kv.commit(again, sessions, tree_room)
        seen = [SequenceInput(q.sequence_id, np.concatenate([q.new_tokens, a.new_tokens]) if q.predict_root
                              else q.new_tokens, q.start_position) for q, a in zip(sequences, again)]
        return seen, root_probs, root_ids

    def rewind_session(self, session: DraftSession, length: int) -> None:
        self.kv.rewind(session, length)
        session.length = length
        del session.tokens[length:]

    @property
    def cold_runs(self) -> int:
        """The runner's first runs of a shape bucket so far (a CUDA graph capture, or a new session's first run):
        an Expand that adds one measured that, not a step."""
        return self.runner.cold_runs

    def rewind(self, sequence_id: str, length: int) -> None:
        """Forget a sequence's committed tokens past `length` (benchmarks repeat a call on the same context)."""
        session = self.sessions.get(sequence_id)
        if not 0 <= length <= session.length:
            raise OutOfRange(f"{length} is outside [0, {session.length}]", "length")
        self.rewind_session(session, length)

    def release(self, sequence_ids: list[str]) -> int:
        return self.sessions.release(sequence_ids)

    def expire(self) -> list[str]:
        return self.sessions.expire()

    # validation

    def validate_budget(self, budget: Budget) -> None:
        k = self.runner.meta.top_k
        if not 1 <= budget.top_k <= k:
            raise InvalidArgument(f"{budget.top_k} is outside [1, {k}] (the draft was exported with top-{k})",
                                  "budget.top_k")
        if budget.max_depth < 0:
            raise InvalidArgument(f"{budget.max_depth} must be >= 0", "budget.max_depth")
        if budget.max_depth > self.max_depth:
            raise OutOfRange(f"{budget.max_depth} is more than this service's {self.max_depth} layers",
                             "budget.max_depth")
        if budget.max_breadth < 1:
            raise InvalidArgument(f"{budget.max_breadth} must be >= 1", "budget.max_breadth")
        if budget.max_returned_nodes < 0:
            raise InvalidArgument(f"{budget.max_returned_nodes} must be >= 0 (0: every node)",
                                  "budget.max_returned_nodes")
        if (nodes := max_tree_nodes(budget)) > self.max_nodes:
            raise OutOfRange(f"top_k {budget.top_k}, max_depth {budget.max_depth} and max_breadth "
                             f"{budget.max_breadth} allow trees of {nodes} nodes, the limit is {self.max_nodes}",
                             "budget")

    def validate_sequences(self, sequences: list[SequenceInput]) -> list[DraftSession | None]:
        """Check every sequence against the request and the cache; the session of each (None: to create)."""
        return check_sequences(sequences, self.runner.meta.vocab_size, self.max_context, self.sessions,
                               lambda session: session.length)

    def grow_trees(self, sequences, budget: Budget, root_probs, root_ids):
        """Layer by layer: keep the best candidates, forward them with a tree mask, collect their children.

        Returns per sequence its tree (trimmed to budget.max_returned_nodes where set), its LayerStats, its layer
        utilities u^(i) (kept_layer_utilities's, from the sums taken here: the nodes a layer kept, or for its last
        layer the best as many as the layer above kept) and the nodes proposed, root included. Only CAST's depth rule
        learns from the utilities: other policies get zeros.
        """
        B, k, cast = len(sequences), budget.top_k, budget.cast
        roots = np.array([q.start_position + q.new_tokens.size - 1 for q in sequences])  # [B] root positions
        # Tree positions stop at the context's end: a sequence near it gets a shallower tree, not an error.
        depth_room = np.minimum(budget.max_depth, self.max_context - 1 - roots)
        shallowest = int(depth_room.min())
        # CAST keeps no candidate that the trimming would drop (_Trees): its breadth rule ranks, and its forwards
        # expand, only candidates that can still be returned.
        trees = _Trees(np.array([int(q.new_tokens[-1]) for q in sequences]),
                       budget.max_returned_nodes if cast is not None else 0)
        scale = cast.scale if cast is not None else lambda depth: 1.0
        siblings = cast is not None and bool(cast.sibling_scales)
        sibling = cast.sibling_scale if siblings else lambda depth: None
        proposed = trees.add_children(np.zeros((B, 1), dtype=np.int64), (depth_room >= 1).astype(np.int64),
                                      root_ids[:, None, :k], root_probs[:, None, :k], scale(1), sibling=sibling(1))
        layers: list[tuple[np.ndarray, np.ndarray, list[float] | np.ndarray]] = []  # per layer: proposed, kept, u^(i)
        kept_above = np.ones(B, dtype=np.int64)  # the layer above's kept nodes per sequence (the root: 1)
        forwarded, depth = 0, 1
        # The efficiency rule's running totals: expected tokens of the tree so far (the root's one, then the kept
        # nodes' values) and the step's cost so far (before any layer, then each layer's forward).
        tokens_so_far = 1.0
        spent = cast.step_base_cost if cast is not None else 0.0
        while proposed.any():
            ranked, ranked_keys, counts = trees.ranked_layer()  # [B, M] candidates by key, best first
            n_keep = min(layer_keep_count(ranked_keys, budget, forwarded), budget.max_breadth)
            kept_counts = np.minimum(counts, n_keep)
            if depth >= shallowest:  # a sequence near the context's end stops here
                kept_counts[depth >= depth_room] = 0
            most_kept = int(kept_counts.max())
            kept = ranked[:, :most_kept]  # row b: its first kept_counts[b]
            utility, sums, top_share = 0.0, None, 1.0
            if cast is not None and most_kept:
                entries = trees.entries(kept)
                kept_values = trees.values[-1].reshape(-1)[entries]
                sums = row_sums(kept_values, kept_counts)
                utility = sum(sums) / B
                if siblings and utility > 0:  # the share of u in top-1 children, which C2's next scale mixes by
                    top_values = np.where(trees.top.reshape(-1)[entries], kept_values, 0.0)
                    top_share = min(sum(row_sums(top_values, kept_counts)) / (utility * B), 1.0)
                if cast.step_base_cost > 0:  # the efficiency rule's (expand_another_layer reads it only then)
                    tokens_so_far += sum(row_sums(trees.keys[-1].reshape(-1)[entries], kept_counts)) / B
            if not most_kept or not expand_another_layer(
                depth, most_kept, utility, budget, forwarded, (tokens_so_far, spent), top_share
            ) or not self.kv.fits(kept_counts):  # the buffers are full: the tree ends here
                kept_counts, most_kept, sums = np.zeros(B, dtype=np.int64), 0, None
            layer_utilities = sums or [0.0] * B
            if cast is not None and not kept_counts.all():
                # A sequence's last layer: its best as many as the layer above kept.
                last = np.minimum(counts, kept_above)
                layer_utilities = np.where(kept_counts > 0, layer_utilities,
                                           row_sums(trees.gather(trees.values[-1], ranked[:, : int(last.max())]), last))
            layers.append((proposed, kept_counts, layer_utilities))
            if not most_kept:
                break
            if cast is not None:
                spent += cast.prices.cost(forwarded, most_kept)
            ragged = B > 1 and int(kept_counts.min()) < most_kept
            # [B, most_kept, K] each; a kept node's parent is the (slot // k)-th node the layer above kept
            probs, ids = self.kv.forward_layer(trees.gather(trees.tokens[-1], kept), kept // k, kept_counts, depth,
                                               roots, ragged)
            forwarded += int(kept_counts.sum())
            proposed = trees.add_children(kept, kept_counts, ids[:, :, :k], probs[:, :, :k], scale(depth + 1), ragged,
                                          sibling(depth + 1))
            kept_above = kept_counts
            depth += 1
        stats: list[list[LayerStats]] = [[] for _ in range(B)]
        utilities: list[list[float]] = [[] for _ in range(B)]
        for layer_proposed, layer_kept, layer_utilities in layers:
            for b in np.nonzero(layer_proposed)[0].tolist():  # the layers where a sequence had candidates
                stats[b].append(LayerStats(candidates=int(layer_proposed[b]), kept=int(layer_kept[b])))
                utilities[b].append(float(layer_utilities[b]) if cast is not None else 0.0)
        return trees.trimmed(budget.max_returned_nodes), stats, utilities, trees.proposed.tolist()
