"""The draft's KV store: each sequence's cache stays in a row of the runner's buffers between calls.

Per batch bucket, the runner's `holders` say whose committed tokens each buffer row holds (a session object: a
released and re-created sequence is another) and how many. In one Expand call of B sequences (bucket Bb >= B):

1. Rows: a sequence whose row holds exactly its committed tokens keeps it; any other gets a free row and is
   recomputed there from its token ids (a new sequence, or one whose row another sequence took or that last ran in
   another bucket). The recompute is one forward over its whole history, like a prompt's first commit.
2. Commit: its new tokens go to columns start .. start+n-1 (position = column), each seeing the columns before it.
3. Tree layers: the kept nodes of each sequence go to the next free columns after its committed ones; a node sees
   the committed columns and its ancestors' columns. Those columns are scratch: the next call's commit writes
   over them.
Nothing crosses between host and device but the rows (ids, positions, columns: small) and the top-K.
"""

from __future__ import annotations

import time

import numpy as np

from draft_service.export import ROW_FIELDS
from draft_service.runner import BATCH_BUCKETS, DraftRunner, bucket


class BufferKV:
    """Commit and layer forwards of one Expand call at a time over a DraftRunner."""

    def __init__(self, runner: DraftRunner, max_context: int, max_depth: int) -> None:
        """max_context, max_depth: the Expander's limits, which the runner's buffers and rows must hold."""
        if runner.width - ROW_FIELDS < max_depth + 1:
            raise ValueError(f"the runner's rows hold {runner.width - ROW_FIELDS} ancestors, trees of "
                             f"{max_depth} layers need {max_depth + 1}")
        if runner.last_column < max_context - 1:
            raise ValueError(f"the runner's buffers hold {runner.capacity} columns, too few for a context of "
                             f"{max_context} and a tree")
        self.runner = runner
        self.model_seconds = 0.0
        # The current call: per sequence its buffer row, its committed length and its next free column; per node of
        # the last tree layer forwarded, its ancestors' columns.
        self.batch = 0
        self.row_of = np.zeros(0, dtype=np.int64)     # [B]
        self.committed = np.zeros(0, dtype=np.int64)  # [B]
        self.next_column = np.zeros(0, dtype=np.int64)  # [B]
        self.ancestors = np.zeros((0, 0, 0), dtype=np.int64)  # [B, N, depth + 1] the last forward's (forward_layer)

    def run(self, rows: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        topk = self.runner.run(rows)
        self.model_seconds += time.perf_counter() - t0
        return topk

    def commit(self, sequences, sessions, tree_room: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Give each sequence a buffer row, write its new tokens' KV (and a recomputed history where needed).
        tree_room: the most columns a tree will use after the committed ones (growing buffers make room at once).

        Returns the root's top-K probabilities and ids per sequence, [B, K] each.
        """
        B = len(sequences)
        # Past the largest bucket: a multiple of it (flexible session, no graphs), so that few buffer sets exist.
        self.batch = bucket(B, BATCH_BUCKETS) or -(-B // BATCH_BUCKETS[-1]) * BATCH_BUCKETS[-1]
        ends = np.array([q.start_position + q.new_tokens.size for q in sequences], dtype=np.int64)
        self.runner.reserve(self.batch, min(int(ends.max()) - 1 + tree_room, self.runner.last_column), shrink=True)
        holders = self.runner.holders(self.batch)
        self.row_of, recompute = self.assign_rows(holders, sessions, [q.start_position for q in sequences])
        # Per sequence: the tokens to forward and the column of the first.
        tokens = [np.concatenate([np.asarray(s.tokens, dtype=np.int64), q.new_tokens]) if again else q.new_tokens
                  for q, s, again in zip(sequences, sessions, recompute)]
        firsts = [0 if again else q.start_position for q, again in zip(sequences, recompute)]
        T = max(t.size for t in tokens)
        rows = self.runner.padding_rows(self.batch, T)  # [Bb, T, W]
        for b, (ids, first) in enumerate(zip(tokens, firsts)):
            r, n = self.row_of[b], ids.size
            columns = first + np.arange(n)
            rows[r, :n, 0] = ids
            rows[r, :n, 1] = columns  # a committed token's position is its column
            rows[r, :n, 2] = columns
            rows[r, :n, 3] = columns + 1  # itself and everything before it
            rows[r, :n, ROW_FIELDS:] = columns[:, None]
        topk = self.run(rows)  # [Bb, T, 2, K]
        for q, s, r, end in zip(sequences, sessions, self.row_of, ends):
            holders[r] = (s, int(end))
            s.tokens.extend(q.new_tokens.tolist())
            s.length = int(end)
        self.committed, self.next_column = ends, ends.copy()
        self.row_starts = np.arange(B)[:, None]
        self.ancestors = np.zeros((0, 0, 0), dtype=np.int64)
        last = topk[self.row_of, np.array([t.size for t in tokens]) - 1]  # [B, 2, K]
        return last[:, 0], last[:, 1].astype(np.int64)

    @staticmethod
    def assign_rows(holders: list[tuple[object, int] | None], sessions, starts: list[int]):
        """Per sequence its row ([B] int64), and whether its KV must be recomputed there ([B] bool)."""
        held = {(id(entry[0]), entry[1]): r for r, entry in enumerate(holders) if entry is not None}
        row_of = np.full(len(sessions), -1, dtype=np.int64)
        for b, (s, start) in enumerate(zip(sessions, starts)):
            row_of[b] = held.get((id(s), start), -1)  # the holder entry keeps s alive: its id is not reused
        taken = set(row_of[row_of >= 0].tolist())
        free = iter([r for r in range(len(holders)) if r not in taken])
        recompute = [bool(r < 0) for r in row_of]
        for b in np.nonzero(row_of < 0)[0]:
            row_of[b] = next(free)
        return row_of, recompute

    def rewind(self, session, length: int) -> None:
        """Rows holding this session hold its first `length` tokens still: say so."""
        for holders in (b.holders for b in self.runner.buffers.values()):
            for r, entry in enumerate(holders):
                if entry is not None and entry[0] is session and entry[1] >= length:
                    holders[r] = (session, length)

    def fits(self, counts: np.ndarray) -> bool:
        """Whether every sequence's kept nodes (counts [B]) fit in the buffers' columns."""
        return bool((self.next_column + counts - 1 <= self.runner.last_column).all())

    def forward_layer(self, tokens: np.ndarray, parent_rows: np.ndarray, counts: np.ndarray, depth: int,
                      roots: np.ndarray, ragged: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """One forward over a tree layer's kept nodes: row b's first counts[b] of tokens [B, N] (ragged False: all N
        of every row), at `depth`, whose parents were row b's parent_rows [B, N]-th nodes in the last forward of this
        call (the root's children: 0). Returns their children's probabilities and ids, [B, N, K] each."""
        B, N = tokens.shape
        if depth == 1:
            self.ancestors = np.full((B, 1, 1), -1, dtype=np.int64)  # the root: committed, every row sees it
        self.runner.reserve(self.batch, int((self.next_column + counts).max()) - 1)
        if ragged or B < self.batch:
            rows = self.runner.padding_rows(self.batch, N)  # [Bb, N, W]
        else:  # the block below fills every row
            rows = np.empty((B, N, self.runner.width), dtype=np.int64)
        columns = self.next_column[:, None] + np.arange(N)  # [B, N] (past a row's count: unused)
        self.next_column += counts
        # Each node's ancestors' columns by depth from 1, its own last (-1 at depth 0): its parent's, then its own.
        # (Past a row's count: garbage, which no node of the next layer reads: they proposed no child.)
        above = self.ancestors.shape[1]
        self.ancestors = np.concatenate(
            [self.ancestors.reshape(B * above, depth)[parent_rows + self.row_starts * above], columns[:, :, None]],
            axis=2)  # [B, N, depth + 1]
        block = np.empty((B, N, rows.shape[2]), dtype=np.int64)
        block[:, :, 0] = tokens
        block[:, :, 1] = roots[:, None] + depth
        block[:, :, 2] = columns
        block[:, :, 3] = self.committed[:, None]
        # The ancestors' columns (the node's own among them); the root (committed) and unused entries repeat its own.
        block[:, :, ROW_FIELDS:] = columns[:, :, None]
        block[:, :, ROW_FIELDS : ROW_FIELDS + depth + 1] = np.where(self.ancestors >= 0, self.ancestors,
                                                                    columns[:, :, None])
        if ragged:  # a row's nodes past its count stay padding
            block = np.where((np.arange(N) < counts[:, None])[:, :, None], block, rows[self.row_of])
        rows[self.row_of] = block
        topk = self.run(rows)[self.row_of]  # [B, N, 2, K]
        return topk[:, :, 0], topk[:, :, 1].astype(np.int64)
