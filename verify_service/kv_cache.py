"""The verifier's KV cache: one slotted store for all sequences, each sequence owning one slot (gpt-fast style).

Per layer, keys and values live in one buffer [S, H_kv, C, D]: S slots, C positions per slot. A sequence's
committed entries are columns [0, length) of its slot. A batched tree forward over B sequences with prefix
lengths P_b writes the N (padded) new entries of every row at the same columns [W0, W0 + N), W0 = max_b P_b, and
attends to columns [0, W0 + N) of its slot: right padding, the columns [P_b, W0) are masked out (target.py builds
the mask). Acceptance then moves each sequence's kept entries from W0 + kept[j] down to P_b + j (keep()).
Nothing below a sequence's length changes before keep(), so a failed forward needs no rollback.

Live sequences hold slots 0..L-1 (freeing a slot moves the last one into the hole), and target.py orders a batch
by slot, so a Verify over all live sequences attends to a view of the buffers: no gather, no scatter. Any other
batch gathers its slots (one copy of [B, H_kv, W0 + N, D] per layer); its new entries are written in place.

The store is also the transformers Cache the model writes through: update() is the one method the attention
layers call. Buffers grow (doubling) on demand, unless the store is `fixed` (the static layout, issue 7): then
allocate_buffers() sets S = max batch and C = max context + tree room once, as one [L, S, H_kv, C, D] tensor for
keys and one for values, so every address stays fixed (CUDA graphs replay on them) and keep() / free() move the
entries of all layers in one indexed copy each. static_forward.py writes a tree's entries at a fixed scratch
column instead of W0 (begin_static_forward).
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
    """One attention layer's buffers; allocated on the first forward, when H_kv, D, dtype and device are known."""

    is_sliding = False  # transformers asks every layer of a Cache

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
        self.keys = keys  # [S, H_kv, C, D]
        self.values = values  # [S, H_kv, C, D]

    def resize(self, slots: int, capacity: int) -> None:
        if self.keys is None or self.keys.shape[0] >= slots and self.keys.shape[2] >= capacity:
            return
        s, h, c, d = self.keys.shape
        for name in ("keys", "values"):
            old = getattr(self, name)
            # Zeros, not empty: masked columns still enter the kernels (score + dtype min, weight 0 x value),
            # and a NaN left there by uninitialised memory would poison the row.
            new = old.new_zeros(max(s, slots), h, max(c, capacity), d)
            new[:s, :, :c] = old
            setattr(self, name, new)


class KVStore(Cache):
    def __init__(self, slots: int = 8, capacity: int = 256, fixed: bool = False) -> None:
        super().__init__(layers=[])
        self.slot_capacity = slots  # S of every buffer
        self.context_capacity = capacity  # C of every buffer
        self.fixed = fixed  # static layout: S and C never change (a full store refuses instead of growing)
        self.keys_all: torch.Tensor | None = None  # [L, S, H_kv, C, D] when allocate_buffers() ran
        self.values_all: torch.Tensor | None = None  # [L, S, H_kv, C, D]
        self.owners: list[SequenceKV] = []  # owners[s]: the sequence in slot s; slots 0..len-1 are live
        self._rows: slice | torch.Tensor | None = None  # the batch of the forward in flight: its slots, in row order
        self.write_at = 0

    def allocate_buffers(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                         device: torch.device) -> None:
        """Every layer's buffers at once, as views of one keys and one values tensor (before any forward)."""
        assert not self.layers, "buffers already exist"
        shape = (layers, self.slot_capacity, kv_heads, self.context_capacity, head_dim)
        # Zeros, not empty: see SlotLayer.resize.
        self.keys_all = torch.zeros(shape, dtype=dtype, device=device)
        self.values_all = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [SlotLayer(self.keys_all[i], self.values_all[i]) for i in range(layers)]

    # --- sequences ----------------------------------------------------------------------------------------------

    def allocate(self) -> SequenceKV:
        if self.fixed and len(self.owners) >= self.slot_capacity:
            raise ResourceExhausted(f"all {self.slot_capacity} KV slots are taken", "sequence_id")
        kv = SequenceKV(self, len(self.owners))
        self.owners.append(kv)
        if len(self.owners) > self.slot_capacity:
            self._resize(max(2 * self.slot_capacity, len(self.owners)), self.context_capacity)
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
        if self.keys_all is not None:
            self.keys_all[:, dst, :, :n] = self.keys_all[:, src, :, :n]
            self.values_all[:, dst, :, :n] = self.values_all[:, src, :, :n]
            return
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys[dst, :, :n] = layer.keys[src, :, :n]
                layer.values[dst, :, :n] = layer.values[src, :, :n]

    def keep(self, kvs: Sequence[SequenceKV], kept: Sequence[Sequence[int]]) -> None:
        """After a forward over kvs: sequence b keeps its new entries kept[b] (increasing node indices), appended at
        its length, in order; the rest are forgotten. One indexed copy per layer and buffer for the whole batch."""
        slots, src, dst = [], [], []
        for kv, nodes in zip(kvs, kept, strict=True):
            for j, node in enumerate(nodes):
                if kv.written_at + node != kv.length + j:  # already in place (same column): nothing to move
                    slots.append(kv.slot)
                    src.append(kv.written_at + node)
                    dst.append(kv.length + j)
        if slots:
            device = self.layers[0].keys.device
            s, a, b = torch.tensor([slots, src, dst], dtype=torch.long).to(device)  # [K] each, one transfer
            # The right side is a copy, so overlapping source and target are fine.
            if self.keys_all is not None:
                # [K, L, H_kv, D] both sides: all layers in one copy (a step's launches add up on a GPU).
                self.keys_all[:, s, :, b] = self.keys_all[:, s, :, a]
                self.values_all[:, s, :, b] = self.values_all[:, s, :, a]
            else:
                for layer in self.layers:
                    layer.keys[s, :, b] = layer.keys[s, :, a]  # [K, H_kv, D] both sides
                    layer.values[s, :, b] = layer.values[s, :, a]
        for kv, nodes in zip(kvs, kept, strict=True):
            kv.length += len(nodes)

    # --- one forward --------------------------------------------------------------------------------------------

    def begin_forward(self, kvs: Sequence[SequenceKV], new_entries: int) -> None:
        """Set the batch the next forward writes to: rows = kvs (in this order), N = new_entries per row."""
        write_at = max(kv.length for kv in kvs)
        width = write_at + new_entries
        if width > self.context_capacity:
            if self.fixed:  # the verifier's context checks keep this from happening
                raise OutOfRange(f"{width} KV columns exceed the static layout's {self.context_capacity}")
            self._resize(self.slot_capacity, max(2 * self.context_capacity, width))
        slots = [kv.slot for kv in kvs]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            self._rows = slice(slots[0], slots[0] + len(slots))  # views of the buffers: no gather
        else:
            device = self.layers[0].keys.device if self.layers else None
            self._rows = torch.tensor(slots, dtype=torch.long, device=device)
        self.write_at = write_at
        for kv in kvs:
            kv.written_at = write_at

    def begin_static_forward(self, kvs: Sequence[SequenceKV], rows: int, write_at: int) -> None:
        """The static layout's forward: rows = slots [0, rows) (the batch kvs among them, the rest dummy rows), new
        entries at columns [write_at, write_at + N) of every row; write_at >= the length of every slot in those
        rows, so no row overwrites a committed entry."""
        assert self.fixed and rows <= self.slot_capacity and all(kv.slot < rows for kv in kvs)
        assert all(kv.length <= write_at for kv in self.owners[:rows])
        self._rows = slice(0, rows)
        self.write_at = write_at
        for kv in kvs:
            kv.written_at = write_at

    def end_forward(self) -> None:
        self._rows = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: [B, H_kv, N, D], the batch's new entries. Returns the [B, H_kv, W0 + N, D] keys
        and values the batch attends to."""
        while len(self.layers) <= layer_idx:
            self.layers.append(SlotLayer())
        layer = self.layers[layer_idx]
        if layer.keys is None:  # a store without allocate_buffers(): sized now, from the first forward
            shape = (self.slot_capacity, key_states.shape[1], self.context_capacity, key_states.shape[3])
            layer.keys = key_states.new_zeros(shape)
            layer.values = value_states.new_zeros(shape)
        rows = self._rows
        if isinstance(rows, torch.Tensor) and rows.device != key_states.device:
            rows = self._rows = rows.to(key_states.device)  # only before the first layer exists
        end = self.write_at + key_states.shape[2]
        layer.keys[rows, :, self.write_at : end] = key_states
        layer.values[rows, :, self.write_at : end] = value_states
        return layer.keys[rows, :, :end], layer.values[rows, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.write_at  # only asked when position_ids are missing, which target.py never lets happen

    def _resize(self, slots: int, capacity: int) -> None:
        self.slot_capacity, self.context_capacity = slots, capacity
        for layer in self.layers:
            layer.resize(slots, capacity)
