"""The dynamic layout's KV: each sequence's cache on the host, a batch's gathered onto the device once a call.

One Expand: `commit` forwards every sequence's new tokens (causal, padded to the longest) on top of its cached KV
and appends their KV to the session for good; `forward_layer` then forwards each tree layer on top of the last
forward's present KV with a tree mask. With the runner's I/O binding (on CUDA) the commit's past crosses to the
device once, every present after it stays there, and only the top-K and the newly committed columns come back.
"""

from __future__ import annotations

import time

import numpy as np

from draft_service.runner import DraftRunner

HIDDEN = -2  # a padding entry in the batched tree columns and paths: matches no node


class HostKV:
    """Commit and layer forwards of one Expand call at a time over a DraftRunner (dynamic layout)."""

    def __init__(self, runner: DraftRunner) -> None:
        self.runner = runner
        self.model_seconds = 0.0  # time inside runner.run during the current call
        # The current call's batched KV and its columns: committed tokens first, then tree nodes.
        self.keys: list = []
        self.values: list = []
        self.committed = np.zeros((0, 0), dtype=bool)                  # [B, L0] columns of committed tokens
        self.tree_columns = np.zeros((0, 0), dtype=np.int64)           # [B, F] tree node held by each column

    def initial_kv(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """A new session's host KV: per layer [Hkv, 16, D], grown by doubling."""
        n = self.runner.meta.num_layers
        return [self.runner.empty_kv(16) for _ in range(n)], [self.runner.empty_kv(16) for _ in range(n)]

    def run(self, input_ids, position_ids, mask, past_keys, past_values):
        t0 = time.perf_counter()
        out = self.runner.run(input_ids, position_ids, mask, past_keys, past_values)
        self.model_seconds += time.perf_counter() - t0
        return out

    def commit(self, sequences, sessions) -> tuple[np.ndarray, np.ndarray]:
        """Forward the new tokens of every sequence (batched, padded) and append their KV to the sessions.

        Returns the root's top-K probabilities and ids per sequence, [B, K] each.
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
        committed = np.zeros((B, P + T), dtype=bool)                         # [B, P+T] columns of committed KV
        causal = np.tril(np.ones((T, T), dtype=bool))
        for b, (q, s, n, p) in enumerate(zip(sequences, sessions, lens, olds)):
            input_ids[b, :n] = q.new_tokens
            # Padding rows repeat the last position (an absolute-position model could not index past the context).
            position_ids[b] = q.start_position + np.minimum(np.arange(T), n - 1)
            visible[b, :, :p] = True
            visible[b, :, P : P + T] = causal
            visible[b, n:] = False  # padding rows see only themselves
            visible[b, np.arange(n, T), P + np.arange(n, T)] = True
            committed[b, :p] = True
            committed[b, P : P + n] = True
            for l in range(len(past_k)):
                past_k[l][b, :, :p] = s.keys[l][:, :p]
                past_v[l][b, :, :p] = s.values[l][:, :p]
        out = self.run(input_ids, position_ids, self.additive(visible), past_k, past_v)
        # The sessions keep their KV on the host. With I/O binding the gather above crossed to the device once
        # (2 * layers * B * Hkv * P * D elements) and only the new columns come back (the same with T for P);
        # the tree layers then run on out.keys / out.values where they are, on the device.
        L = len(out.keys)
        new = self.runner.columns_to_host([*out.keys, *out.values], P, P + T)  # 2L x [B, Hkv, T, D]
        new_k, new_v = new[:L], new[L:]
        for b, (s, n) in enumerate(zip(sessions, lens)):
            s.append([k[b, :, :n] for k in new_k], [v[b, :, :n] for v in new_v])
        self.keys, self.values, self.committed = out.keys, out.values, committed
        self.tree_columns = np.full((B, 0), HIDDEN, dtype=np.int64)
        last = np.asarray(lens) - 1
        return out.probs[np.arange(B), last], out.ids[np.arange(B), last]

    def rewind(self, session, length: int) -> None:
        pass  # columns past the session's length are free already

    def fits(self, kept) -> bool:
        return True  # the KV grows with every forward

    def forward_layer(self, trees, kept, roots) -> tuple[np.ndarray, np.ndarray]:
        """One forward over the kept nodes of every sequence, on top of the batched KV: committed tokens, then
        the tree nodes forwarded so far. A node sees the committed tokens, its ancestors and itself;
        position = root position + depth. Returns the children's probabilities and ids, [B, N, K] each.
        """
        committed, tree_columns = self.committed, self.tree_columns
        B, L0 = committed.shape
        F = tree_columns.shape[1]
        N = max(kp.size for kp in kept)
        input_ids = np.zeros((B, N), dtype=np.int64)                      # [B, N]
        position_ids = np.zeros((B, N), dtype=np.int64)                   # [B, N]
        new_columns = np.full((B, N), HIDDEN, dtype=np.int64)             # [B, N]
        paths = np.full((B, N, trees[0].paths.shape[1]), HIDDEN, dtype=np.int64)  # [B, N, depth+1]
        for b, (t, kp) in enumerate(zip(trees, kept)):
            n = kp.size
            input_ids[b, :n] = t.tokens[kp]
            position_ids[b, :n] = roots[b] + t.depths[kp]
            new_columns[b, :n] = kp
            paths[b, :n] = t.paths[kp]
        real = np.arange(N)[None, :] < np.array([kp.size for kp in kept])[:, None]  # [B, N] not padding
        visible = np.zeros((B, N, L0 + F + N), dtype=bool)                # [B, N, L0+F+N]
        visible[:, :, :L0] = committed[:, None, :] & real[:, :, None]
        # A tree column is visible when its node is on the query node's path.
        on_path = (tree_columns[:, None, :, None] == paths[:, :, None, :]).any(-1)  # [B, N, F]
        visible[:, :, L0 : L0 + F] = on_path & real[:, :, None]
        visible[:, :, L0 + F :] = np.eye(N, dtype=bool)  # itself (same-layer nodes are never ancestors)
        out = self.run(input_ids, position_ids, self.additive(visible), self.keys, self.values)
        self.keys, self.values = out.keys, out.values
        self.tree_columns = np.concatenate([tree_columns, new_columns], axis=1)
        return out.probs, out.ids

    def additive(self, visible: np.ndarray) -> np.ndarray:
        """[B, T, S] bool -> [B, 1, T, S] additive mask in the model's dtype."""
        mask = np.where(visible, 0.0, self.runner.mask_min).astype(self.runner.dtype)
        return mask[:, None]
