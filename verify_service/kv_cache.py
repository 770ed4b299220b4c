"""The verifier's KV cache: one store of fixed buffers for all sequences, each sequence owning one slot (gpt-fast).

Keys and values live in two tensors [L, S, H_kv, C, D], allocated once: S slots (so at most S live sequences) and
C columns per slot (max context + tree room). Addresses never change, so CUDA graphs replay on them. A sequence's
committed entries are columns [0, length) of its slot.

A forward over a batch writes every row's N new entries at the same columns [W, W + N), W >= every row's length,
and attends to columns [0, W + N) of its slot; the columns between a row's length and W are masked out (the
caller builds the mask). Acceptance then moves each sequence's kept entries from W + node down to length + j
(keep(), all layers in one indexed copy). Nothing below a sequence's length changes before keep(), so a failed
forward needs no rollback.

Live sequences hold slots 0..L-1 (freeing a slot moves the last one into the hole). The rows of a forward are
either slots [0, rows) (begin_verify: static_forward.py, whose shapes stay fixed per bucket) or the batch's own
slots (begin_prefill: a view when they are consecutive, else a gather).

The store is also the transformers Cache the model writes through: update() is the one method the attention
layers call (fused_llama.py calls it the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Cache

from cast_core.errors import OutOfRange, ResourceExhausted


class SequenceKV:
    """One sequence's share of the store: its slot and how many entries it has committed."""

    __slots__ = ("store", "slot", "length", "written_at")

    def __init__(self, store: KVStore, slot: int) -> None:
        self.store = store
        self.slot = slot  # -1 once freed
        self.length = 0
        self.written_at = 0  # column of the first entry of the last forward over this sequence (not yet kept)

    def free(self) -> None:
        self.store.free(self)


class SlotLayer:
    """One attention layer's keys and values: views of the store's buffers."""

    is_sliding = False  # transformers asks every layer of a Cache

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys  # [S, H_kv, C, D]
        self.values = values  # [S, H_kv, C, D]


class KVStore(Cache):
    def __init__(self, layers: int, slots: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (layers, slots, kv_heads, capacity, head_dim)
        # Zeros, not empty: masked columns still enter the kernels (score + dtype min, weight 0 x value), and a NaN
        # left there by uninitialised memory would poison the row.
        self.keys_all = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, H_kv, C, D]
        self.values_all = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, H_kv, C, D]
        super().__init__(layers=[SlotLayer(self.keys_all[i], self.values_all[i]) for i in range(layers)])
        self.slot_capacity = slots  # S
        self.context_capacity = capacity  # C
        self.owners: list[SequenceKV] = []  # owners[s]: the sequence in slot s; slots 0..len-1 are live
        self._rows: slice | torch.Tensor | None = None  # the batch of the forward in flight: its slots, in row order
        self.write_at = 0

    @property
    def nbytes(self) -> int:
        return 2 * self.keys_all.numel() * self.keys_all.element_size()

    # --- sequences ----------------------------------------------------------------------------------------------

    def allocate(self) -> SequenceKV:
        if len(self.owners) >= self.slot_capacity:
            raise ResourceExhausted(f"all {self.slot_capacity} KV slots are taken", "sequence_id")
        kv = SequenceKV(self, len(self.owners))
        self.owners.append(kv)
        return kv

    def free(self, kv: SequenceKV) -> None:
        """Give kv's slot back; the last live sequence moves into it, so live slots stay 0..L-1. Idempotent."""
        if kv.slot < 0:
            return
        last = self.owners.pop()
        if last is not kv:
            self._copy_slot(last.slot, kv.slot, last.length)
            last.slot = kv.slot
            self.owners[kv.slot] = last
        kv.slot = -1

    def copy_into(self, src: SequenceKV, dst: SequenceKV) -> None:
        """dst gets src's committed entries (the profiler fills a batch from one prefill)."""
        self._copy_slot(src.slot, dst.slot, src.length)
        dst.length = src.length

    def _copy_slot(self, src: int, dst: int, n: int) -> None:
        """Columns [0, n) of slot src to slot dst, in every layer."""
        self.keys_all[:, dst, :, :n] = self.keys_all[:, src, :, :n]
        self.values_all[:, dst, :, :n] = self.values_all[:, src, :, :n]

    def keep(self, kvs: Sequence[SequenceKV], kept: Sequence[Sequence[int]]) -> None:
        """After a forward over kvs: sequence b keeps its new entries kept[b] (increasing node indices), appended at
        its length, in order; the rest are forgotten. One indexed copy per buffer for the whole batch."""
        slots, src, dst = [], [], []
        for kv, nodes in zip(kvs, kept, strict=True):
            for j, node in enumerate(nodes):
                if kv.written_at + node != kv.length + j:  # already in place (same column): nothing to move
                    slots.append(kv.slot)
                    src.append(kv.written_at + node)
                    dst.append(kv.length + j)
        if slots:
            s, a, b = torch.tensor([slots, src, dst], dtype=torch.long).to(self.keys_all.device)  # [K] each
            # [K, L, H_kv, D] both sides, all layers in one copy; the right side is a copy, so overlaps are fine.
            self.keys_all[:, s, :, b] = self.keys_all[:, s, :, a]
            self.values_all[:, s, :, b] = self.values_all[:, s, :, a]
        for kv, nodes in zip(kvs, kept, strict=True):
            kv.length += len(nodes)

    # --- one forward --------------------------------------------------------------------------------------------

    def begin_prefill(self, kvs: Sequence[SequenceKV], new_entries: int) -> None:
        """Rows = kvs (in this order), their new entries at W = the longest row's length."""
        write_at = max(kv.length for kv in kvs)
        if write_at + new_entries > self.context_capacity:  # the verifier's context checks keep this from happening
            raise OutOfRange(f"{write_at + new_entries} KV columns exceed the store's {self.context_capacity}")
        slots = [kv.slot for kv in kvs]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            self._rows = slice(slots[0], slots[0] + len(slots))  # views of the buffers: no gather
        else:
            self._rows = torch.tensor(slots, dtype=torch.long, device=self.keys_all.device)
        self._begin(kvs, write_at)

    def begin_verify(self, kvs: Sequence[SequenceKV], rows: int, write_at: int) -> None:
        """Rows = slots [0, rows) (the batch kvs among them, the rest dummy rows), new entries at write_at, which
        is >= the length of every slot in those rows, so no row overwrites a committed entry."""
        assert rows <= self.slot_capacity and all(kv.slot < rows for kv in kvs)
        assert all(kv.length <= write_at for kv in self.owners[:rows])
        self._rows = slice(0, rows)
        self._begin(kvs, write_at)

    def _begin(self, kvs: Sequence[SequenceKV], write_at: int) -> None:
        self.write_at = write_at
        for kv in kvs:
            kv.written_at = write_at

    def end_forward(self) -> None:
        self._rows = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: [B, H_kv, N, D], the batch's new entries. Returns the [B, H_kv, W + N, D] keys
        and values the batch attends to."""
        layer = self.layers[layer_idx]
        end = self.write_at + key_states.shape[2]
        layer.keys[self._rows, :, self.write_at : end] = key_states
        layer.values[self._rows, :, self.write_at : end] = value_states
        return layer.keys[self._rows, :, :end], layer.values[self._rows, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.write_at  # only asked when position_ids are missing, which target.py never lets happen
