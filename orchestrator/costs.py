"""What a step costs on a (draft replica, verify replica) pair: the replicas' profiled tables plus what a step
costs beyond the model's forward, measured online per replica.

Each replica sends its cost table in Describe: pure forward times. A real step also pays for the RPC, the
services' own Python, masks and serialisation. That overhead hardly depends on the number of tree nodes, so it is
learned as one moving average per batch size and added to every cell: the profiled shape of the cost curve stays,
and its level follows what the orchestrator observes. (Moving single cells toward observations instead would make
visited cells look dearer than unvisited ones and drive the policy away from whatever it just measured.)

The draft is paid per call and per forward. An Expand's RPC (the wall time beyond the draft service's own
reported time) is paid once whatever the tree, so it must not price a layer: spread over the forwards, it made every
extra layer look as dear as a whole call and CAST stopped at depth 1-2 on the GPU. Only the service's own time
beyond its profiled forwards is the draft's own: part of it is paid per forward (a layer's Python, its masks),
part per node (top-k per node, the tree's arrays, the bytes sent back). The two are fitted by least squares over the
latest Expands, whose trees vary in width and depth (`ExpandFit`). Spread over the forwards alone, a wide layer
looked nearly free on a GPU, whose forward costs are flat in tokens: CAST expanded ~350 nodes a step where a fixed
tree expanded 69, and its steps took 2 ms longer at batch 1 and twice their predicted time at batch 32
(reports/cast-vs-fixed, GPU round 4).
A replica without a table starts from a prior (a mild linear cost) and is corrected the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cast_core.cost_table import CostTable, NormalizedCostSlice

PRIOR_BATCHES = (1, 2, 4, 8, 16, 32)
PRIOR_CONTEXTS = (128, 512, 2048, 8192)
PRIOR_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)
# Rows of the draft's slice: tree nodes forwarded so far in one Expand.
NODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ONLINE_WEIGHT = 0.2  # moving-average weight of one observation
FIT_WEIGHT = 0.05  # ExpandFit: weight of one Expand (its fit follows the latest ~20)
NODE_RIDGE = 0.01  # ExpandFit: a per-node cost is only fitted where the trees' sizes vary enough to show it
MIN_PRICE = 1e-3  # the least a tree's growth costs, in one-token verify steps (a hidden draft, a flat verifier)


def prior_table(role: str, lam_ms: float, delta_ms: float) -> CostTable:
    return CostTable.linear(
        lam_ms, delta_ms, batch_sizes=PRIOR_BATCHES, context_buckets=PRIOR_CONTEXTS, token_counts=PRIOR_TOKENS,
        device="unknown", model_id=f"prior:{role}", dtype="unknown",
    )


def _moving(average: float | None, sample: float) -> float:
    return sample if average is None else (1 - ONLINE_WEIGHT) * average + ONLINE_WEIGHT * sample


PRIORS = {"verify": (0.05, 5.0), "draft": (0.02, 1.0)}  # (lam_ms, delta_ms) of a replica with no table


@dataclass
class ExpandFit:
    """An Expand's service time beyond its profiled forwards, fitted as per_forward * forwards + per_node * nodes
    (both >= 0) over the latest Expands: moving means of the normal equations' terms. Where the trees all have one
    shape the split is not identifiable and it all goes per forward (the ridge on per_node)."""

    moments: np.ndarray = field(default_factory=lambda: np.zeros(5))  # means of F², F N, N², F y, N y

    def add(self, forwards: int, nodes: int, excess_ms: float) -> tuple[float, float]:
        """One Expand; returns the fit (per_forward, per_node) in ms."""
        sample = np.array([forwards * forwards, forwards * nodes, nodes * nodes, forwards * excess_ms,
                           nodes * excess_ms], dtype=np.float64)
        first = not self.moments.any()
        self.moments = sample if first else (1 - FIT_WEIGHT) * self.moments + FIT_WEIGHT * sample
        ff, fn, nn, fy, ny = self.moments
        nn_ridge = nn * (1 + NODE_RIDGE)
        det = ff * nn_ridge - fn * fn
        per_forward, per_node = ((nn_ridge * fy - fn * ny) / det, (ff * ny - fn * fy) / det) if det > 0 else (0, 0)
        if per_node <= 0 or det <= 0:
            return max(fy / ff, 0.0) if ff > 0 else 0.0, 0.0
        if per_forward < 0:
            return 0.0, max(ny / nn_ridge, 0.0)
        return float(per_forward), float(per_node)


@dataclass
class ReplicaCosts:
    """One replica's profiled table (or a prior) and what its calls cost beyond it, learned online. Every pairing of
    the replica (CostModel) shares this object, so the corrections are per replica."""

    table: CostTable
    overhead_ms: dict[int, float] = field(default_factory=dict)  # per batch size: verify: a step beyond its forward;
                                                                 # draft: one forward beyond the model
    call_ms: dict[int, float] = field(default_factory=dict)      # draft, per batch size: an Expand's RPC, once a call
    node_ms: dict[int, float] = field(default_factory=dict)      # draft, per batch size: one tree node beyond its forward
    fits: dict[int, ExpandFit] = field(default_factory=dict)     # draft, per batch size: what node_ms and overhead_ms
                                                                 # come from

    @staticmethod
    def for_replica(role: str, table: CostTable | None) -> ReplicaCosts:
        return ReplicaCosts(table or prior_table(role, *PRIORS[role]))


@dataclass
class CostModel:
    verify: CostTable
    draft: CostTable
    verify_overhead_ms: dict[int, float] = field(default_factory=dict)  # per batch size: a step beyond its forward
    draft_overhead_ms: dict[int, float] = field(default_factory=dict)   # per batch size: one draft forward beyond the model
    draft_call_ms: dict[int, float] = field(default_factory=dict)       # per batch size: an Expand's RPC, once per call
    draft_node_ms: dict[int, float] = field(default_factory=dict)       # per batch size: a forwarded node beyond the model
    draft_fits: dict[int, ExpandFit] = field(default_factory=dict)      # per batch size: the two fitted above
    levels: dict[str, CostModel] = field(default_factory=dict)  # the draft replica's levels, each with its table
    # draft_slice's table parts, which change only with the table cells they read: (cells) -> ([nodes][counts] ms of
    # the draft's forwards, of the verifier's extra cost)
    _slice_tables: dict[tuple, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)

    @staticmethod
    def from_tables(verify: CostTable | None, draft: CostTable | None) -> CostModel:
        return CostModel.pair(ReplicaCosts.for_replica("verify", verify), ReplicaCosts.for_replica("draft", draft))

    @staticmethod
    def pair(verify: ReplicaCosts, draft: ReplicaCosts) -> CostModel:
        """A step's prices on this (verify replica, draft replica) pair; what it learns goes to each replica."""
        return CostModel(verify.table, draft.table, verify.overhead_ms, draft.overhead_ms, draft.call_ms,
                         draft.node_ms, draft.fits)

    @property
    def verifier_on_gpu(self) -> bool:
        """Whether the verify replica's table was profiled on a GPU (its device names one: not cpu, not a prior)."""
        return self.verify.device not in ("cpu", "unknown")

    def verify_step_ms(self, batch: int, context: int, tokens: int) -> float:
        return self.verify.lookup(batch, context, tokens) + self.verify_overhead_ms.get(batch, 0.0)

    def draft_forward_ms(self, batch: int, context: int, tokens: int) -> float:
        return (self.draft.lookup(batch, context, tokens) + self.draft_overhead_ms.get(batch, 0.0)
                + self.draft_node_ms.get(batch, 0.0) * tokens)

    def expand_ms(self, batch: int, context: int, forwards: list[tuple[int, int]]) -> float:
        """An Expand's predicted time: the call's learned RPC cost and its forwards [(tree nodes so far, tokens)]."""
        return self.draft_call_ms.get(batch, 0.0) + sum(self.draft_forward_ms(batch, context + nodes, n)
                                                        for nodes, n in forwards)

    def rerank_costs(self, batch: int, context: int, max_tokens: int) -> np.ndarray:
        """[max_tokens] c_k = S_T(B)[ctx][k] / S_T(B)[ctx][1], the step overhead included in both."""
        steps = self.verify.costs_for_counts(batch, context, max_tokens) + self.verify_overhead_ms.get(batch, 0.0)
        return steps / steps[0]

    def draft_slice(self, batch: int, context: int, draft_share: float = 1.0) -> NormalizedCostSlice:
        """The prices of growing the tree by k nodes after r, in units of a one-token verify step: the draft's
        forward (at the committed context plus the tree so far) and the verifier's extra cost for checking them.
        draft_share: the part of the draft's time that the step waits for (1; less for a tree drafted while the
        last step was verified: only what ran past that Verify delays the step).

        The verifier's share is what keeps CAST's breadth and depth rules from growing nodes that reranking (C3)
        must drop: a node worth less than its verification is never verified, nor is any of its descendants (a
        child is worth at most its parent). Where the verifier's cost is flat in tokens (a GPU at small batch) the
        share is ~0; where it grows steeply (a CPU at batch 8) the tree stays narrow and shallow.
        """
        # The tables' part is built once per set of cells it reads (a step at the same batch and context buckets
        # reuses it); the online overheads change every step and are added each time.
        cells = self.price_cells(batch, context)
        tables = self._slice_tables.get(cells)
        if tables is None:
            rows = [self.draft.row(batch, context + r) for r in NODE_BUCKETS]  # [len(NODE_BUCKETS)] x [len(counts)]
            tables = np.array(rows), self.verify_extra_ms(batch, context, NODE_BUCKETS, self.draft.token_counts)
            self._slice_tables[cells] = tables
        draft, verify_extra = tables
        one_token_step = self.verify_step_ms(batch, context, 1)
        node_ms = self.draft_node_ms.get(batch, 0.0) * np.asarray(self.draft.token_counts, dtype=np.float64)
        matrix = (draft_share * (draft + self.draft_overhead_ms.get(batch, 0.0) + node_ms) + verify_extra) / one_token_step
        matrix = np.maximum(matrix, MIN_PRICE)  # a wholly hidden draft: the rules divide by these
        return NormalizedCostSlice(NODE_BUCKETS, self.draft.token_counts, matrix)

    def price_cells(self, batch: int, context: int) -> tuple[int, ...]:
        """The table cells that a step's prices at (batch, context) read (draft_slice, drafted_step_base,
        rerank_costs). Two contexts with the same cells have the same prices, given the same online overheads."""
        return (*self.draft.cell(batch, context, 1)[:2], *self.verify.cell(batch, context, 1)[:2],
                *(self.draft.cell(batch, context + r, 1)[1] for r in NODE_BUCKETS))

    def drafted_step_base(self, batch: int, context: int, draft_share: float = 1.0) -> float:
        """What a drafted step costs before its first layer, in units of a one-token verify step: that step itself
        (1), the Expand call's RPC and its commit forward (the tokens committed since the last call: ~1 + accepted,
        priced at one token, as the tables' cost is nearly flat there); the draft's part times draft_share."""
        one_token_step = self.verify_step_ms(batch, context, 1)
        call = self.draft_call_ms.get(batch, 0.0) + self.draft_forward_ms(batch, context, 1)
        return 1.0 + draft_share * call / one_token_step

    def verify_extra_ms(self, batch: int, context: int, before: Sequence[int], added: Sequence[int]) -> np.ndarray:
        """[len(before)] x [len(added)] the verifier's extra milliseconds for a tree of root + r + k nodes over one
        of root + r, interpolated between the table's token counts (the marginal cost of the k nodes, not the jump
        to the next bucket)."""
        grid = self.verify.token_counts
        row = self.verify.row(batch, context)
        r = np.asarray(before, dtype=np.float64)[:, None]
        k = np.asarray(added, dtype=np.float64)[None, :]
        return np.interp(1 + r + k, grid, row) - np.interp(2 + r, grid, row)

    def observe_verify(self, batch: int, context: int, tokens: int, seconds: float) -> None:
        extra = seconds * 1e3 - self.verify.lookup(batch, context, tokens)
        self.verify_overhead_ms[batch] = max(_moving(self.verify_overhead_ms.get(batch), extra), 0.0)

    def observe_draft(self, batch: int, context: int, forwards: list[tuple[int, int]], seconds: float,
                      service_seconds: float | None = None) -> None:
        """One Expand made `forwards` = [(nodes so far, new tokens)] in `seconds` of wall time, `service_seconds` of
        them in the draft service. The service's time beyond the profiled forwards is fitted per forward and per
        node (ExpandFit); the rest is the call's. Without the service's time (an older draft), all of it is the
        service's."""
        if not forwards:
            return
        service_seconds = seconds if service_seconds is None else min(service_seconds, seconds)
        predicted = sum(self.draft.lookup(batch, context + nodes, n) for nodes, n in forwards)
        fit = self.draft_fits.setdefault(batch, ExpandFit())
        per_forward, per_node = fit.add(len(forwards), sum(n for _, n in forwards), service_seconds * 1e3 - predicted)
        self.draft_overhead_ms[batch], self.draft_node_ms[batch] = per_forward, per_node
        self.draft_call_ms[batch] = _moving(self.draft_call_ms.get(batch), (seconds - service_seconds) * 1e3)
