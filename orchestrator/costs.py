"""What a step costs on one (draft replica, verify replica) pair: their profiled tables, corrected online.

Each replica sends its cost table in Describe. A replica without one starts from a prior (a mild linear cost), and
every step's measured wall time, RPC included, moves the cell it ran in toward what was observed, so a stale or
missing profile corrects itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cast_core.cost_table import CostTable, NormalizedCostSlice, normalized_draft_slice

PRIOR_BATCHES = (1, 2, 4, 8, 16, 32)
PRIOR_CONTEXTS = (128, 512, 2048, 8192)
PRIOR_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)
# Rows of the draft's slice: tree nodes forwarded so far in one Expand.
NODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ONLINE_WEIGHT = 0.2  # moving-average weight of one observation: a profile off by 2x corrects in ~10 steps


def prior_table(role: str, lam_ms: float, delta_ms: float) -> CostTable:
    return CostTable.linear(
        lam_ms, delta_ms, batch_sizes=PRIOR_BATCHES, context_buckets=PRIOR_CONTEXTS, token_counts=PRIOR_TOKENS,
        device="unknown", model_id=f"prior:{role}", dtype="unknown",
    )


@dataclass
class CostModel:
    verify: CostTable
    draft: CostTable

    @staticmethod
    def from_tables(verify: CostTable | None, draft: CostTable | None) -> CostModel:
        return CostModel(
            verify=verify or prior_table("verify", lam_ms=0.05, delta_ms=5.0),
            draft=draft or prior_table("draft", lam_ms=0.02, delta_ms=1.0),
        )

    def rerank_costs(self, batch: int, context: int, max_tokens: int) -> np.ndarray:
        """[max_tokens] c_k = S_T(B)[ctx][k] / S_T(B)[ctx][1]."""
        return self.verify.normalized_costs(batch, context, max_tokens)

    def draft_slice(self, batch: int, context: int) -> NormalizedCostSlice:
        """The draft's prices for one Expand: its forwards run at the committed context plus the tree so far."""
        return normalized_draft_slice(
            self.draft, self.verify, batch, context, node_buckets=NODE_BUCKETS, draft_context_offset=context
        )

    def observe_verify(self, batch: int, context: int, tokens: int, seconds: float) -> None:
        self.verify = self.verify.observe(batch, context, tokens, seconds * 1e3, ONLINE_WEIGHT)

    def observe_draft(self, batch: int, context: int, forwards: list[tuple[int, int]], seconds: float) -> None:
        """One Expand made `forwards` = [(nodes so far, new tokens)]; spread its wall time over them in proportion
        to what the table predicted, then move each cell toward its share."""
        predicted = [self.draft.lookup(batch, context + nodes, n) for nodes, n in forwards]
        total = sum(predicted)
        if not forwards or total <= 0:
            return
        scale = seconds * 1e3 / total
        for (nodes, n), p in zip(forwards, predicted):
            self.draft = self.draft.observe(batch, context + nodes, n, p * scale, ONLINE_WEIGHT)
