"""The draft model over fixed KV buffers (the export's static layout), so that ONNX Runtime can replay CUDA graphs.

A dynamic-layout forward on the CUDA provider is launch-bound: ~130 kernels and ORT's per-node host work for a
2-layer draft, about 1 ms a run, however small the model. A CUDA graph replays them in one launch, but only for
fixed shapes at fixed device addresses. So here:

- Each batch bucket B (1, 2, 4, ... 32) owns two sets of KV buffers [B, Hkv, S, D] per layer on the device.
  A run reads one set and writes the other (ping-pong: ONNX has no in-place outputs), then the roles swap.
- Each (B, T) bucket, T new tokens per sequence (1, 2, 4, ... 64), gets a session whose symbolic sizes are fixed
  (ONNX Runtime's free-dimension overrides: every shape known, the shape arithmetic folded away) and, on CUDA,
  `enable_cuda_graph`: two graphs per session, one per ping-pong direction (the `gpu_graph_id` run option).
  The rows input and the top-K output are preallocated per bucket; rows are padded to T with rows that write
  and see only the buffer's last column (the trash column).
- Anything larger (a prompt, B > 32) runs on one more session without fixed sizes and without graphs.

A row is [token id, position, KV column, visible prefix, ancestors...] (export.py); the caller (DeviceKV in
device_kv.py) decides which sequence lives in which buffer row and which columns each token uses.
On the CPU provider the same buckets run without graphs: the tests check this path there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from draft_service.export import ROW_FIELDS, STATIC_DIMS, ExportMeta, static_io_names
from draft_service.runner import DEVICES, PROVIDERS, choose_provider

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TREE_ROOM = 512  # buffer columns past the context for a tree's nodes (a tree that needs more ends early)


def bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= n, or None past the largest."""
    return next((b for b in buckets if b >= n), None)


@dataclass
class _BatchBuffers:
    """The two KV buffer sets of one batch bucket; `current` holds the latest written. `holders` says, per row,
    whose committed tokens it holds and how many (kept by DeviceKV; with the buffers, so that every user of this
    runner sees when another took a row)."""

    sets: tuple[list[ort.OrtValue], list[ort.OrtValue]]  # per set: key0, value0, key1, ... [B, Hkv, S, D]
    holders: list[tuple[object, int] | None]
    current: int = 0


@dataclass
class _Bucket:
    """The fixed inputs and outputs of one (B, T) session, and its bindings per ping-pong direction."""

    session: ort.InferenceSession
    rows: ort.OrtValue  # [B, T, W] int64
    topk: ort.OrtValue  # [B, T, 2, K] float32
    bindings: dict[int, ort.IOBinding] = field(default_factory=dict)  # by the set read
    ran: set[int] = field(default_factory=set)  # directions run once (on CUDA: captured)


class StaticRunner:
    """rows [B, T, W] -> top-K [B, T, 2, K]; the KV stays in this runner's buffers."""

    def __init__(self, onnx_path: str | Path, meta: ExportMeta, provider: str = "auto", capacity: int = 0,
                 ancestors: int = 65, threads: int = 0, spinning: bool = False,
                 cuda_graphs: bool | None = None) -> None:
        if meta.layout != "static":
            raise ValueError(f"StaticRunner needs the static layout, got {meta.layout!r}")
        self.meta = meta
        self.onnx_path = str(onnx_path)
        self.provider = choose_provider(provider)
        self.device = DEVICES[self.provider]
        self.dtype = np.dtype(meta.dtype)
        # S columns per sequence: its tokens, then its tree's nodes; the last column is the padding rows' trash.
        self.capacity = capacity or meta.max_context + TREE_ROOM
        self.width = ROW_FIELDS + ancestors  # W: a row's fields, then the visible ancestor columns
        on_cuda = self.provider == PROVIDERS["cuda"]
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs needs the CUDA provider")
        self.threads, self.spinning = threads, spinning
        if on_cuda and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        self.input_names, self.output_names = static_io_names(meta.num_layers)
        self.flexible = ort.InferenceSession(self.onnx_path, sess_options=self._options(),
                                             providers=[self.provider])
        self.buffers: dict[int, _BatchBuffers] = {}
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        # First runs of a (batch, tokens) bucket in one direction: a CUDA graph capture on CUDA, the new session's
        # first run on CPU. Either costs many steps' time once.
        self.cold_runs = 0
        self.trash = self.capacity - 1
        self.run_options = {}
        for direction in (0, 1):
            options = ort.RunOptions()
            if self.cuda_graphs:
                options.add_run_config_entry("gpu_graph_id", str(direction))
            self.run_options[direction] = options

    @property
    def backend(self) -> str:
        return f"onnxruntime:{self.provider}+static" + ("+cudagraph" if self.cuda_graphs else "")

    def padding_rows(self, batch: int, tokens: int) -> np.ndarray:
        """[B, T, W] rows that change nothing: token 0 at position 0, writing and seeing only the trash column."""
        rows = np.full((batch, tokens, self.width), self.trash, dtype=np.int64)
        rows[..., :2] = 0
        rows[..., 3] = 0
        return rows

    def holders(self, batch: int) -> list[tuple[object, int] | None]:
        """Per row of a batch bucket's buffers: (the session whose tokens it holds, how many), or None."""
        return self._buffers(batch).holders

    def run(self, rows: np.ndarray) -> np.ndarray:
        """One forward; rows [B, T, W] with B a batch bucket or above the largest. Returns top-K [B, T, 2, K]."""
        B, T, W = rows.shape
        if W != self.width:
            raise ValueError(f"rows have {W} fields, this runner {self.width}")
        buffers = self._buffers(B)
        read = buffers.current
        padded = bucket(T, TOKEN_BUCKETS)
        if B not in BATCH_BUCKETS or padded is None:
            topk = self._run_flexible(rows, buffers.sets[read], buffers.sets[1 - read])
        else:
            if padded != T:
                rows = np.concatenate([rows, self.padding_rows(B, padded - T)], axis=1)
            topk = self._run_bucket(self._bucket(B, padded), rows, buffers, read)[:, :T]
        buffers.current = 1 - read
        return topk

    def _run_bucket(self, b: _Bucket, rows: np.ndarray, buffers: _BatchBuffers, read: int) -> np.ndarray:
        b.rows.update_inplace(np.ascontiguousarray(rows))
        binding = b.bindings.get(read)
        if binding is None:
            binding = b.bindings[read] = b.session.io_binding()
            binding.bind_ortvalue_input("rows", b.rows)
            for name, value in zip(self.input_names[1:], buffers.sets[read]):
                binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output("topk", b.topk)
            for name, value in zip(self.output_names[1:], buffers.sets[1 - read]):
                binding.bind_ortvalue_output(name, value)
        if read not in b.ran:
            b.ran.add(read)
            self.cold_runs += 1
        b.session.run_with_iobinding(binding, self.run_options[read])
        return b.topk.numpy()

    def _run_flexible(self, rows: np.ndarray, read: list[ort.OrtValue], write: list[ort.OrtValue]) -> np.ndarray:
        binding = self.flexible.io_binding()
        binding.bind_cpu_input("rows", np.ascontiguousarray(rows))
        for name, value in zip(self.input_names[1:], read):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("topk", "cpu")
        for name, value in zip(self.output_names[1:], write):
            binding.bind_ortvalue_output(name, value)
        self.flexible.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _buffers(self, batch: int) -> _BatchBuffers:
        buffers = self.buffers.get(batch)
        if buffers is None:
            shape = (batch, self.meta.num_kv_heads, self.capacity, self.meta.head_dim)  # [B, Hkv, S, D]
            # One array each: on the CPU provider an OrtValue wraps its array's memory instead of copying it.
            sets = tuple([ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self.dtype), self.device, 0)
                          for _ in range(2 * self.meta.num_layers)] for _ in range(2))
            buffers = self.buffers[batch] = _BatchBuffers(sets, [None] * batch)
        return buffers

    def _bucket(self, batch: int, tokens: int) -> _Bucket:
        b = self.buckets.get((batch, tokens))
        if b is None:
            options = self._options()
            for name, size in zip(STATIC_DIMS, (batch, tokens, self.capacity, self.width)):
                options.add_free_dimension_override_by_name(name, size)
            provider = self.provider
            if self.cuda_graphs:
                provider = (self.provider, {"enable_cuda_graph": "1"})
            session = ort.InferenceSession(self.onnx_path, sess_options=options, providers=[provider])
            rows = ort.OrtValue.ortvalue_from_numpy(self.padding_rows(batch, tokens), self.device, 0)
            topk = ort.OrtValue.ortvalue_from_numpy(
                np.zeros((batch, tokens, 2, self.meta.top_k), dtype=np.float32), self.device, 0)
            b = self.buckets[(batch, tokens)] = _Bucket(session, rows, topk)
        return b

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        # As in DraftRunner: idle ORT threads that spin slow down a verifier sharing the CPU.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return options

    def warm(self, batches: tuple[int, ...] = (1,)) -> None:
        """Run (on CUDA: capture) every token bucket of these batch buckets in both directions, with rows that
        write only the trash column: serving then finds those graphs ready."""
        for batch in batches:
            for tokens in TOKEN_BUCKETS:
                for _ in range(2):
                    self.run(self.padding_rows(batch, tokens))
