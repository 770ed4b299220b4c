"""The CAST selection rule and the three decisions built on it (Hu, Hong, Tan, arXiv 2510.26577, Algorithm 1).

One rule, `select_count`, answers "how many of these items are worth their cost?" from cumulative utilities
u_1..u_n and cumulative costs c_1..c_n. Three decisions use it or its ratio test:

- breadth pruning (C1), in the draft: how many of a layer's candidates to keep, n_i;
- depth pruning (C2), in the draft: whether to expand one more layer, with the gain buffer (R, alpha);
- reranking (C3), in the orchestrator: how many expanded nodes the verifier checks, m.

Units. A utility is a sum of node values v (product of draft probabilities along the path, EAGLE-2's score),
i.e. an expected number of accepted tokens. A cost is a forward time divided by the verifier's one-token forward
S_T(B)[ctx][1], so 1.0 is "one plain decoding step". A threshold is therefore "expected accepted tokens per
plain-decoding-step of cost" that an extra item must bring.

Batches: the B sequences of a step share one draft forward per layer and one verifier forward, so breadth and
reranking choose one count for the whole batch, from the batch average of each sequence's top-k value sum.
Sequences may have different trees, hence ragged candidate lists (padding adds value 0).

Pure: numpy only, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cast_core.tree import TokenTree

# The paper hand-set thresholds per model (values near 4 / 3 / 2.5). Ours come from measured sweeps
# (reports/policies/, reports/gpu-reference-pair/): with costs in units of one plain
# decoding step, a threshold of 1 means "a node must pay for itself at least as well as plain decoding does".
# C3 = 2.5 verified a single node a step on the CPU and lost 3x to plain decoding; C2 = 3 (our earlier default,
# chosen while the tables were inflated by load and an Expand's RPC was priced per layer) stopped trees at depth 3-4
# and lost to chain; with both fixed, 1 / 1 / 1 is within a few percent of the best setting on the CPU and the GPU.
# R is our choice.
DEFAULT_BREADTH_THRESHOLD = 1.0  # C1
DEFAULT_DEPTH_THRESHOLD = 1.0  # C2
DEFAULT_RERANK_THRESHOLD = 1.0  # C3
DEFAULT_GAIN_BUFFER_SIZE = 8  # R

# Ratios that are equal on paper must not flip on rounding (Theorem 4.1 sits exactly on the boundary).
_REL_TOL = 1e-9
_ABS_TOL = 1e-12


@dataclass(frozen=True)
class CastParams:
    """Thresholds C1, C2, C3 and gain-buffer length R. Validated on creation."""

    breadth_threshold: float = DEFAULT_BREADTH_THRESHOLD  # C1
    depth_threshold: float = DEFAULT_DEPTH_THRESHOLD  # C2
    rerank_threshold: float = DEFAULT_RERANK_THRESHOLD  # C3
    gain_buffer_size: int = DEFAULT_GAIN_BUFFER_SIZE  # R

    def __post_init__(self) -> None:
        for name in ("breadth_threshold", "depth_threshold", "rerank_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.gain_buffer_size, bool) or not isinstance(self.gain_buffer_size, int):
            raise ValueError(f"gain_buffer_size must be an int, got {self.gain_buffer_size!r}")
        if self.gain_buffer_size < 1:
            raise ValueError(f"gain_buffer_size must be >= 1, got {self.gain_buffer_size}")


def _worth_it(utility_gain: float, cost_gain: float, threshold: float) -> bool:
    """The ratio test gain_u / gain_c >= threshold, written without dividing.

    A step whose cost does not increase (cost_gain <= 0: tile effects, next-bucket-up lookups) is free and
    passes, since utilities never decrease.
    """
    if cost_gain <= 0:
        return True
    needed = threshold * cost_gain
    return utility_gain >= needed or math.isclose(utility_gain, needed, rel_tol=_REL_TOL, abs_tol=_ABS_TOL)


def select_count(utilities: np.ndarray, costs: np.ndarray, threshold: float, *, min_keep: int = 1) -> int:
    """Algorithm 1: how many leading items to keep, k in [min_keep, n].

    utilities: [n] u_1..u_n, cumulative utility of keeping the first k items (non-decreasing).
    costs:     [n] c_1..c_n, cumulative cost of keeping the first k items (any shape: steps, plateaus).

    The first `min_keep` items are kept unconditionally (the callers need at least one: a layer keeps a node,
    the verifier checks the root) and the last accepted point k' starts there; with min_keep = 0 it starts at
    the origin (u_0, c_0) = (0, 0). Then every k > k' is tested against k':

        accept k (and set k' = k)  iff  (u_k - u_k') / (c_k - c_k') >= threshold,  or  c_k <= c_k' (free).

    A failing k does not stop the scan: a later k may clear the threshold against the same k'. With a concave
    utility and convex cost (sorted values, linear costs) this equals stopping at the first failure; with step
    costs (GPU tiles, bucketed tables) it lets the free items after a price jump pay for the jump, which is
    what "against the last accepted point" buys. Returns the last accepted k.
    """
    u = np.asarray(utilities, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    if u.ndim != 1 or u.shape != c.shape:
        raise ValueError(f"utilities and costs must be 1-D of one length, got {u.shape} and {c.shape}")
    n = u.shape[0]
    if not 0 <= min_keep <= n:
        raise ValueError(f"min_keep={min_keep} does not fit {n} items")
    # Checked on plain floats: this runs for every layer of every Expand (n <= 8) and every step's reranking
    # (n <= a policy's verify_tokens), where a numpy call per check cost more than the scan.
    u_list, c_list = u.tolist(), c.tolist()
    if not (all(map(math.isfinite, u_list)) and all(map(math.isfinite, c_list))):
        raise ValueError("utilities and costs must be finite")
    if any(after < before for before, after in zip(u_list, u_list[1:])):
        raise ValueError("utilities must be non-decreasing (cumulative sums of values >= 0)")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")

    kept = min_keep
    u_kept, c_kept = (u_list[kept - 1], c_list[kept - 1]) if kept else (0.0, 0.0)
    # _worth_it, inlined: reranking scans every expanded node (100-300) each step.
    for k in range(kept, n):  # item k + 1
        cost_gain = c_list[k] - c_kept
        if cost_gain > 0:
            utility_gain = u_list[k] - u_kept
            needed = threshold * cost_gain
            if utility_gain < needed and not math.isclose(utility_gain, needed, rel_tol=_REL_TOL, abs_tol=_ABS_TOL):
                continue
        kept, u_kept, c_kept = k + 1, u_list[k], c_list[k]
    return kept


def batch_topk_utilities(values_per_sequence: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """[max_n] u_k = (1/B) * sum_b (sum of the top-k values of sequence b), k = 1..max_n.

    values_per_sequence: B arrays, sequence b with its own n_b >= 0 values in any order (ragged batch); a single
    1-D array is one sequence (B = 1). A sequence with fewer than k values contributes all of them.
    """
    if isinstance(values_per_sequence, np.ndarray) and values_per_sequence.ndim == 2:
        padded = values_per_sequence.astype(np.float64, copy=False)  # B rows of n values each (the draft's layers)
        if padded.shape[0] == 0:
            raise ValueError("a batch needs at least one sequence")
        batch = padded
    else:
        batch = [values_per_sequence] if _is_one_sequence(values_per_sequence) else list(values_per_sequence)
        if not batch:
            raise ValueError("a batch needs at least one sequence")
        # Few numpy calls for the whole batch: this runs for every layer of every Expand (the breadth rule).
        padded = _one_array(batch)
    if padded is None:
        arrays = [np.asarray(v, dtype=np.float64) for v in batch]
        if any(v.ndim != 1 for v in arrays):
            raise ValueError("values must be 1-D arrays of finite numbers >= 0, one per sequence")
        padded = np.zeros((len(arrays), max(v.shape[0] for v in arrays)), dtype=np.float64)  # [B, max_n]; pad: 0
        for b, v in enumerate(arrays):
            padded[b, : v.shape[0]] = v
    # min >= 0 fails on NaN, max < inf on inf: two reductions instead of two masks (this runs for every layer)
    if padded.size and not (padded.min() >= 0 and padded.max() < np.inf):
        b = next(b for b, row in enumerate(padded) if not ((row >= 0).all() and np.isfinite(row).all()))
        raise ValueError(f"sequence {b}: values must be a 1-D array of finite numbers >= 0")
    padded = np.sort(padded, axis=1)[:, ::-1]  # descending; the padding (0, the least value) stays last
    # sum / B is what mean() computes, bit for bit, without its Python wrapper (this runs for every layer).
    return np.cumsum(padded, axis=1).sum(axis=0) / padded.shape[0]


def _one_array(batch: list) -> np.ndarray | None:
    """[B, n] float64 when every sequence has n values (the usual case, one numpy call), else None (ragged)."""
    if len({len(v) for v in batch}) != 1:
        return None
    rows = np.array(batch, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError("values must be 1-D arrays of finite numbers >= 0, one per sequence")
    return rows


def _is_one_sequence(values: Sequence[np.ndarray] | np.ndarray) -> bool:
    return isinstance(values, np.ndarray) and values.ndim == 1


def _check_costs(costs: np.ndarray, needed: int, name: str) -> np.ndarray:
    c = np.asarray(costs, dtype=np.float64)
    if c.ndim != 1 or c.shape[0] < needed:
        raise ValueError(f"{name} must be 1-D with at least {needed} entries (k = 1..{needed}), got {c.shape}")
    return c[:needed]


# ---- value calibration per depth ---------------------------------------------------------------------------------


def depth_scale(scales: Sequence[float], depth: int) -> float:
    """The scale of a node at `depth` (>= 1): scales[depth - 1], the last one past their end, 1 without any."""
    if not scales:
        return 1.0
    return float(scales[min(depth, len(scales)) - 1])


def sibling_scale(scales: Sequence[float], sibling_scales: Sequence[float], depth: int) -> float:
    """The scale of a node at `depth` that is not its parent's top child: sibling_scales' entry, capped by the top
    children's at that depth (a sibling never outranks its top brother); without sibling_scales, the depth's one."""
    top = depth_scale(scales, depth)
    return min(depth_scale(sibling_scales, depth), top) if sibling_scales else top


def top_children(tree: TokenTree) -> np.ndarray:
    """[N] bool: whether each node is its parent's top child, the child of highest value, the first in tree order
    among equals (the root: False). The draft adds each parent's top-k children in descending probability, so this
    is its top-1 child; a tree trimmed by calibrated value keeps it whenever it keeps a sibling."""
    return _top_children(tree.values, tree.parents, tree.depths > 0)


def _top_children(values: np.ndarray, parents: np.ndarray, children: np.ndarray) -> np.ndarray:
    """top_children over nodes whose parents index the same arrays (one tree, or trees concatenated with their
    parents offset); children: the nodes that have a parent (not a root)."""
    top = np.zeros(values.shape[0], dtype=bool)
    idx = np.nonzero(children)[0]
    if idx.size:
        order = idx[np.lexsort((idx, -values[idx], parents[idx]))]  # by parent, then value desc, then index
        first = np.ones(order.size, dtype=bool)
        first[1:] = parents[order[1:]] != parents[order[:-1]]
        top[order[first]] = True
    return top


def calibrated_values(tree: TokenTree, scales: Sequence[float], sibling_scales: Sequence[float] = ()) -> np.ndarray:
    """[N] float64: each node's expected accepted tokens, min(its parent's, s * value) at depth d, s = scales[d-1]
    for a top child (top_children) and sibling_scale(...) for the others; 1 for the root. scales, sibling_scales:
    accepted tokens per unit of value at each depth, as measured (orchestrator/calibration.py); no sibling_scales:
    scales for every node.

    The draft's value (the product of its probabilities) underrates a deep node where the draft agrees with the
    target more than its probabilities say, and by more the deeper it is: one scale for all depths cannot fix
    both ends. Its top-1 child is accepted more often than its value says and its other children less (about 2x
    less per unit of value on the reference pair: reports/cast-vs-fixed/calibration_offline.md), so one scale per
    depth overvalued the siblings that a larger cut adds. The min keeps a child below its parent (a path is
    accepted only through its parent), so the top-m nodes by calibrated value stay a tree. The draft computes the
    same numbers layer by layer (draft_service/expansion.py), so both sides rank nodes alike.
    """
    return batch_calibrated_values([tree], scales, sibling_scales)[0]


def batch_calibrated_values(trees: Sequence[TokenTree], scales: Sequence[float],
                            sibling_scales: Sequence[float] = ()) -> list[np.ndarray]:
    """calibrated_values of each tree, computed for all of them at once (the orchestrator's step does it for every
    sequence of its batch).

    A node's calibrated value is the least scaled value on its path from the root (the min of each node and its
    parent's, applied from the root down), so it is found by pointer jumping over the trees concatenated: each
    round takes the min with the ancestor 2^r levels up, log2(depth) rounds of three numpy calls for the whole
    batch, where a loop per tree and depth took four calls per depth and tree. The same numbers: a min is exact."""
    if len(trees) == 1:  # nothing to concatenate
        raw, depths, starts = trees[0].values, trees[0].depths, np.zeros(1, dtype=np.int64)
        parents = np.maximum(trees[0].parents, 0)  # the root (0) is its own ancestor: the jumps stop there
    else:
        sizes = [len(t) for t in trees]
        raw = np.concatenate([t.values for t in trees])
        depths = np.concatenate([t.depths for t in trees])
        starts = np.cumsum([0, *sizes[:-1]])  # [B] each tree's root
        parents = np.concatenate([t.parents for t in trees]) + np.repeat(starts, sizes)
        parents[starts] = starts  # a root is its own ancestor: the jumps stop there
    values = raw.astype(np.float64)
    deepest = int(depths.max())
    if deepest:
        layers = range(1, deepest + 1)
        scale = np.asarray([depth_scale(scales, d) for d in layers])[np.maximum(depths, 1) - 1]
        if sibling_scales:
            other = np.asarray([sibling_scale(scales, sibling_scales, d) for d in layers])[np.maximum(depths, 1) - 1]
            scale = np.where(_top_children(raw, parents, depths > 0), scale, other)
        values *= scale
    values[starts] = 1.0
    for _ in range(deepest.bit_length()):  # after r rounds, the min over the 2^r - 1 nearest ancestors and itself
        values = np.minimum(values, values[parents])
        parents = parents[parents]
    return np.split(values, starts[1:]) if len(trees) > 1 else [values]


# ---- C1: breadth pruning ----------------------------------------------------------------------------------------


def breadth_keep(
    candidate_values: Sequence[np.ndarray] | np.ndarray, costs: np.ndarray, threshold: float
) -> int:
    """n_i: how many candidates layer i keeps, the same count for every sequence of the batch (>= 1).

    candidate_values: B arrays [n_b], the values v of sequence b's candidates at layer i (the top-K children of
                      the previous layer's kept nodes), any order; ragged across sequences.
    costs:            [>= max n_b] normalised draft cost of a forward over k new tokens at "nodes so far",
                      S_D(B)[nodes so far][k] / S_T(B)[ctx][1], entry k-1 for k = 1, 2, ...
                      (NormalizedCostSlice.costs_for_counts gives it).
    threshold:        C1.

    Utility of keeping k: batch average of each sequence's top-k value sum. A sequence with fewer candidates
    than n_i keeps all of its own. To respect the budget's max_breadth, pass at most max_breadth values per
    sequence (clipping the result instead would keep a count the rule never tested).
    """
    utilities = batch_topk_utilities(candidate_values)
    if utilities.shape[0] == 0:
        raise ValueError("no candidates: a layer needs at least one to keep")
    return select_count(utilities, _check_costs(costs, utilities.shape[0], "costs"), threshold, min_keep=1)


def theorem_4_1_breadth_threshold(candidate_values: Sequence[np.ndarray] | np.ndarray, top_k: int, lam: float) -> float:
    """C1 = sum_j v_i^(j)(K) / (B * lam): the batch's K-th largest values summed, over B * lam.

    v_i^(j)(K) is the K-th largest candidate value of sequence j at layer i. Under linear cost c_k = lam*k + delta
    this C1 makes breadth pruning keep exactly K: EAGLE-2's fixed top-K (Theorem 4.1).
    """
    batch = [candidate_values] if _is_one_sequence(candidate_values) else list(candidate_values)
    if top_k < 1 or lam <= 0 or any(np.asarray(v).shape[0] < top_k for v in batch):
        raise ValueError("Theorem 4.1 needs K >= 1, lam > 0 and at least K candidates per sequence")
    kth = [float(-np.sort(-np.asarray(v, dtype=np.float64))[top_k - 1]) for v in batch]
    return sum(kth) / (len(batch) * lam)


# ---- C2: depth pruning ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GainBuffer:
    """FIFO of the last R layer-to-layer utility gains phi = u^(i+1) / u^(i); alpha is their mean.

    Starts full of 1s: before any evidence, expect the next layer to be worth as much as this one (optimistic,
    since a node's children share at most its own value, so phi <= 1 once layers are fully kept).
    """

    gains: tuple[float, ...] = field(default_factory=lambda: (1.0,) * DEFAULT_GAIN_BUFFER_SIZE)

    def __post_init__(self) -> None:
        if not self.gains:
            raise ValueError("a gain buffer holds at least one gain (R >= 1)")
        if not all(math.isfinite(g) and g >= 0 for g in self.gains):
            raise ValueError(f"gains must be finite and >= 0, got {self.gains}")

    @staticmethod
    def full_of_ones(size: int = DEFAULT_GAIN_BUFFER_SIZE) -> GainBuffer:
        """A fresh buffer of length R = size."""
        if size < 1:
            raise ValueError(f"R must be >= 1, got {size}")
        return GainBuffer((1.0,) * size)

    @property
    def size(self) -> int:
        """R."""
        return len(self.gains)

    @property
    def alpha(self) -> float:
        """alpha: the mean gain, the predicted ratio u^(i+1) / u^(i)."""
        return sum(self.gains) / len(self.gains)

    def push(self, gain: float) -> GainBuffer:
        """A buffer with `gain` appended and the oldest gain dropped."""
        return GainBuffer((*self.gains[1:], float(gain)))

    def extend(self, gains: Sequence[float]) -> GainBuffer:
        """A buffer with each of `gains` pushed in order."""
        return GainBuffer((*self.gains, *map(float, gains))[-len(self.gains):])  # one buffer, validated once


def layer_sums(kept_values: Sequence[np.ndarray] | np.ndarray) -> list[float]:
    """Per sequence, the summed values of the nodes it kept at a layer (float64 sums)."""
    batch = [kept_values] if _is_one_sequence(kept_values) else list(kept_values)
    if not batch:
        raise ValueError("a batch needs at least one sequence")
    rows = _one_array(batch)
    if rows is not None:  # one numpy call for the batch, the same sums
        return rows.sum(axis=1).tolist()
    return [float(np.sum(np.asarray(v, dtype=np.float64))) for v in batch]


def layer_utility(kept_values: Sequence[np.ndarray] | np.ndarray) -> float:
    """u^(i): batch average of the summed values of the nodes kept at layer i (expected accepted tokens there)."""
    sums = layer_sums(kept_values)
    return sum(sums) / len(sums)


def layer_gains(layer_utilities: Sequence[float]) -> list[float]:
    """[D-1] phi_i = u^(i+1) / u^(i) for consecutive layers; pairs with u^(i) = 0 give no evidence and are skipped."""
    return [after / before for before, after in zip(layer_utilities, layer_utilities[1:]) if before > 0]


def should_expand(alpha: float, utility: float, cost: float, threshold: float) -> bool:
    """C2 test: expand layer i+1 iff alpha * u^(i) / c^(i) >= C2.

    alpha:   mean of the gain buffer, so alpha * u^(i) predicts u^(i+1), what the next layer would add.
    utility: u^(i), `layer_utility` of the nodes kept at layer i.
    cost:    c^(i), normalised draft cost of the forward that expands layer i+1, i.e. over the n_i kept nodes
             of layer i at "nodes so far": S_D(B)[nodes so far][n_i] / S_T(B)[ctx][1].
    A cost <= 0 is free: expand.
    """
    return _worth_it(alpha * utility, cost, threshold)


# ---- C3: reranking ----------------------------------------------------------------------------------------------


def rerank_count(values: Sequence[np.ndarray] | np.ndarray, costs: np.ndarray, threshold: float) -> int:
    """m: how many nodes of each tree, root included, the verifier checks (>= 1; 1 is plain decoding).

    values:    [N] values of all expanded nodes of one tree, root (value 1) included, any order; or B such
               arrays for a batch verified in one forward (ragged), which then share one m.
    costs:     [>= max N] c_k = S_T(B)[ctx][k] / S_T(B)[ctx][1], entry k-1 for k = 1, 2, ...
               (CostTable.normalized_costs gives it; c_1 = 1).
    threshold: C3.

    u_k is the (batch average of the) sum of the top-k values. Keep the top-m nodes by value with
    TokenTree.top_m(m): values never grow from parent to child, so they form a tree.
    """
    utilities = batch_topk_utilities(values)
    if utilities.shape[0] == 0:
        raise ValueError("a tree has at least its root")
    return select_count(utilities, _check_costs(costs, utilities.shape[0], "costs"), threshold, min_keep=1)


def kept_layer_utilities(expanded: TokenTree, kept_per_layer: Sequence[int]) -> list[float]:
    """u^(i) per layer: the summed values of the nodes each layer kept (its best `kept` by value).

    The last layer proposes no children (kept 0): it is priced by as many of its best as the layer above kept.
    """
    # One sort by (depth, value) for all layers instead of a mask and a sort per layer; each layer's ascending run
    # is then read backwards exactly as np.sort(layer)[::-1] would be (the same float32 sums).
    order = np.lexsort((expanded.values, expanded.depths))  # [N] by depth, then value ascending
    values = expanded.values[order]
    starts = np.searchsorted(expanded.depths[order], np.arange(1, len(kept_per_layer) + 2)).tolist()  # [D + 1]
    utilities = []
    previous = 1
    for depth, kept in enumerate(kept_per_layer, start=1):
        take = kept or previous
        utilities.append(float(values[starts[depth - 1]:starts[depth]][::-1][:take].sum()))
        previous = take
    return utilities


def batch_gains(gains: GainBuffer, per_sequence: Sequence[Sequence[float]]) -> GainBuffer:
    """Push one step's layer-to-layer gains phi = u^(i+1) / u^(i) into the buffer, u^(i) the batch average (the
    depth rule tests the batch average too). One gain per layer, not per sequence: at batch 8 a push per sequence
    would replace the whole buffer (R = 8) with one step's first layers.

    per_sequence: each sequence's u^(i) per layer, as the draft measured them (kept_layer_utilities)."""
    if not per_sequence:
        return gains
    depth = max(len(u) for u in per_sequence)
    batch_average = [sum(u[i] for u in per_sequence if i < len(u)) / len(per_sequence) for i in range(depth)]
    return gains.extend(layer_gains(batch_average))


def most_efficient_cut(utilities: np.ndarray, costs: np.ndarray, limit: int, value_scale: float = 1.0) -> int:
    """argmax over m <= limit of u_m / c_m: u_m the batch-average expected tokens of each tree's top m nodes (the
    root's 1, then value_scale per unit of the others' values), c_m = costs[m-1].

    Within the reranking rule's bound this keeps the step's tokens per unit of cost highest: a fixed threshold alone
    keeps nodes whose value beats their marginal cost yet lowers the step's efficiency, which loses to plain
    decoding where cost grows with batch x nodes (CPUs, large batches).

    utilities: [max N] batch_topk_utilities of the trees' values.
    """
    expected = 1 + value_scale * (utilities[:limit] - 1)  # [limit]
    return int(np.argmax(expected / costs[: expected.shape[0]])) + 1
