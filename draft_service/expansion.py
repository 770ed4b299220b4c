"""Tree expansion on the draft model: the domain of the draft service (numpy + runner, no gRPC).

Per sequence the draft keeps a KV cache of every committed token it has seen. One Expand call, for a batch:

1. Commit: forward each sequence's new tokens (causal) on top of its cache and append their KV for good.
   The last new token is the tree's root (node 0); its top-K are the candidates of layer 1. A start position
   before the cache's end rewinds it there first (a prepared branch the verifier did not take). A prepared Expand
   (`predict_root`) commits one more token, the draft's own top-1 after the new ones, and roots the tree there.
2. Expand, EAGLE-2 style: each layer keeps its best candidates by value (`layer_keep_count`); if another layer
   is wanted (`expand_another_layer`), one forward over the kept nodes, with a tree mask, gives each of them
   top_k children: the next layer's candidates, value = parent value * draft probability.
   CAST also drops, before its breadth rule, every candidate below the value of the tree's `max_returned_nodes`-th
   best node so far: the trimming in 3 would drop it and all its descendants, so expanding it is wasted draft
   work (the planner sets that bound from the counts its reranking verified lately).
   CAST ranks and weighs nodes by their calibrated value (the orchestrator's measured accepted tokens per unit of
   value at the node's depth, never above the parent's: selection.calibrated_values), the returned trees' values
   stay the draft's own.
3. Return every candidate of every layer (kept or not; or the best `max_returned_nodes` by value): the
   orchestrator reranks. The tree's KV was temporary: only the committed tokens stay in the cache.

Those two functions are where CAST's breadth (C1) and depth (C2) pruning plug in.

The KV lives in rows of the runner's buffers (kv.py, runner.py): only the top-K of each forward come back to the
host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cast_core.cost_table import NormalizedCostSlice
from cast_core.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, ResourceExhausted
from cast_core.selection import breadth_keep, depth_scale, layer_sums, should_expand
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

    def scale(self, depth: int) -> float:
        """Accepted tokens per unit of value at `depth` (the last scale past the end)."""
        return depth_scale(self.depth_scales, depth)


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


def layer_keep_count(layer_values: list[np.ndarray], budget: Budget, nodes_so_far: int) -> int:
    """How many candidates of the current layer each sequence keeps (the kept ones propose children).

    layer_values: per sequence, its candidates' (calibrated) values sorted descending. nodes_so_far: tree nodes
    forwarded so far in this call, the row of the draft's cost slice. EAGLE-2: a fixed max_breadth. CAST: the
    breadth rule (C1) on the batch-average cumulative value against the cost of forwarding k nodes, within
    max_breadth.
    """
    if budget.cast is None:
        return budget.max_breadth
    values = [v[: budget.max_breadth] for v in layer_values]
    widest = max((v.size for v in values), default=0)
    if widest == 0:
        return budget.max_breadth
    costs = budget.cast.prices.costs_for_counts(nodes_so_far, widest)
    return breadth_keep(values, costs, budget.cast.breadth_threshold)


def expand_another_layer(depth: int, kept: int, utility: float, budget: Budget, nodes_so_far: int,
                         tree_so_far: tuple[float, float] = (1.0, 0.0)) -> bool:
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
    matters where a draft layer costs a fair share of a verify step.
    """
    if depth >= budget.max_depth:
        return False
    if budget.cast is None:
        return True
    if kept == 0:
        return False
    cast = budget.cast
    cost = cast.prices.cost(nodes_so_far, kept)
    expected = cast.scale(depth + 1) * utility  # in expected tokens, at the next layer's calibration
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


class _Tree:
    """A tree being grown, in preallocated arrays. paths[i] lists node i's ancestors by depth, itself included
    (-1 past its depth): the tree mask compares KV columns against it. keys[i]: node i's calibrated value, what
    ranks it (selection.calibrated_values, computed layer by layer; the values themselves without CAST)."""

    def __init__(self, root_token: int, capacity: int, max_depth: int) -> None:
        self.tokens = np.zeros(capacity, dtype=np.int64)
        self.parents = np.full(capacity, -1, dtype=np.int64)
        self.depths = np.zeros(capacity, dtype=np.int64)
        self.values = np.zeros(capacity, dtype=np.float32)
        self.keys = np.zeros(capacity, dtype=np.float64)
        self.paths = np.full((capacity, max_depth + 1), -1, dtype=np.int64)  # [N, depth+1]
        self.tokens[0], self.values[0], self.keys[0], self.paths[0, 0] = root_token, 1.0, 1.0, 0
        self.size = 1

    def add_children(self, parents: np.ndarray, tokens: np.ndarray, probs: np.ndarray,
                     scale: float = 1.0) -> np.ndarray:
        """parents [n]; tokens, probs [n, k]: each parent's top-k; scale: the calibration at their depth. Returns
        the new nodes' indices [n * k]."""
        n, k = tokens.shape
        new = np.arange(self.size, self.size + n * k)
        parent = np.repeat(parents, k)
        self.tokens[new] = tokens.reshape(-1)
        self.parents[new] = parent
        self.depths[new] = self.depths[parent] + 1
        # float32 product of a value and a probability <= 1: never above the parent's value.
        self.values[new] = (self.values[parents][:, None] * probs).reshape(-1)
        self.keys[new] = np.minimum(self.keys[parent], scale * self.values[new].astype(np.float64))
        self.paths[new] = self.paths[parent]
        self.paths[new, self.depths[new]] = new
        self.size += n * k
        return new

    def value_floor(self, m: int) -> float:
        """The m-th largest key among the nodes so far (0 while there are at most m). A node below it can never be
        among the tree's best m, nor can any of its descendants (a child is worth at most its parent)."""
        if self.size <= m:
            return 0.0
        return float(np.partition(self.keys[: self.size], self.size - m)[self.size - m])

    def to_token_tree(self, keep: int = 0) -> TokenTree:
        """The tree, trimmed to its best `keep` nodes by key where keep > 0."""
        n = self.size
        tree = TokenTree(self.tokens[:n].copy(), self.parents[:n].copy(), self.depths[:n].copy(),
                         self.values[:n].copy())
        return tree.top_m(keep, self.keys[:n]) if keep > 0 else tree


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
        trees, stats, utilities = self.grow_trees(sequences, budget, root_probs, root_ids)
        out = []
        for q, t, s, u in zip(sequences, trees, stats, utilities):
            out.append(Expansion(q.sequence_id, t.to_token_tree(budget.max_returned_nodes), s, u, t.size))
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

        Returns per sequence its tree, its LayerStats and its layer utilities u^(i) (kept_layer_utilities's, from
        the sums taken here: the nodes a layer kept, or for its last layer the best as many as the layer above
        kept). Only CAST's depth rule learns from the utilities: other policies get zeros.
        """
        B, k = len(sequences), budget.top_k
        roots = np.array([q.start_position + q.new_tokens.size - 1 for q in sequences])  # [B] root positions
        # Tree positions stop at the context's end: a sequence near it gets a shallower tree, not an error.
        depth_room = np.minimum(budget.max_depth, self.max_context - 1 - roots)
        capacity = max_tree_nodes(budget)
        trees = [_Tree(int(q.new_tokens[-1]), capacity, budget.max_depth) for q in sequences]
        stats: list[list[LayerStats]] = [[] for _ in range(B)]
        utilities: list[list[float]] = [[] for _ in range(B)]
        empty = np.zeros(0, dtype=np.int64)
        # Per sequence, the node indices of the current layer's candidates.
        scale = budget.cast.scale if budget.cast is not None else lambda depth: 1.0
        layer = [t.add_children(np.array([0]), root_ids[b : b + 1, :k], root_probs[b : b + 1, :k], scale(1))
                 if depth_room[b] >= 1 else empty for b, t in enumerate(trees)]
        forwarded, depth = 0, 1
        # The efficiency rule's running totals: expected tokens of the tree so far (the root's one, then the kept
        # nodes' values) and the step's cost so far (before any layer, then each layer's forward).
        tokens_so_far = 1.0
        spent = budget.cast.step_base_cost if budget.cast is not None else 0.0
        while any(nodes.size for nodes in layer):
            # Candidates by value, best first (stable: ties keep tree order, so a parent beats an equal child).
            ranked = [nodes[np.argsort(-t.keys[nodes], kind="stable")] for nodes, t in zip(layer, trees)]
            if budget.cast is not None and budget.max_returned_nodes > 0:
                ranked = [r[t.keys[r] >= t.value_floor(budget.max_returned_nodes)] for r, t in zip(ranked, trees)]
            n_keep = min(layer_keep_count([t.keys[r] for r, t in zip(ranked, trees)], budget, forwarded),
                         budget.max_breadth)
            kept = [r[:n_keep] if depth < depth_room[b] else empty for b, r in enumerate(ranked)]
            most_kept = max(kp.size for kp in kept)
            utility, sums = 0.0, None
            if budget.cast is not None and most_kept:
                sums = layer_sums([t.values[kp] for kp, t in zip(kept, trees)])
                utility = sum(sums) / B
                tokens_so_far += sum(float(t.keys[kp].sum()) for kp, t in zip(kept, trees)) / B
            if not most_kept or not expand_another_layer(
                depth, most_kept, utility, budget, forwarded, (tokens_so_far, spent)
            ) or not self.kv.fits(kept):  # the buffers are full: the tree ends here
                kept, sums = [empty] * B, None
            for b, t in enumerate(trees):
                if not layer[b].size:
                    continue
                stats[b].append(LayerStats(candidates=int(layer[b].size), kept=int(kept[b].size)))
                if budget.cast is not None and kept[b].size:
                    utilities[b].append(sums[b])
                elif budget.cast is not None:  # its last layer: its best as many as the layer above kept (root: 1)
                    above = stats[b][-2].kept if len(stats[b]) > 1 else 1
                    utilities[b].append(float(t.values[ranked[b][:above]].sum(dtype=np.float64)))
            if not any(kp.size for kp in kept):
                break
            if budget.cast is not None:
                spent += budget.cast.prices.cost(forwarded, max(kp.size for kp in kept))
            probs, ids = self.kv.forward_layer(trees, kept, roots)  # [B, N, K] each
            forwarded += sum(kp.size for kp in kept)
            layer = [t.add_children(kp, ids[b, : kp.size, :k], probs[b, : kp.size, :k], scale(depth + 1))
                     if kp.size else empty for b, (t, kp) in enumerate(zip(trees, kept))]
            depth += 1
        if budget.cast is None:
            utilities = [[0.0] * len(s) for s in stats]
        return trees, stats, utilities
