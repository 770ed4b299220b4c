"""The exported draft graph on ONNX Runtime, over KV buffers that this runner owns (export.py: rows in, top-K out).

- Each batch bucket B (1, 2, 4, ... 32) owns two sets of KV buffers [B, Hkv, S, D] per layer. A run reads one set
  and writes the other (ping-pong: ONNX has no in-place outputs), then the roles swap. A row's last column is the
  trash column: padding rows write and see only it.
- Fixed buffers (the default on CUDA): S = `capacity` from the start, and each (B, T) bucket, T new tokens per
  sequence (1, 2, 4, ... 64), gets a session whose symbolic sizes are fixed (ONNX Runtime's free-dimension
  overrides: every shape known, the shape arithmetic folded away) with preallocated rows and top-K, rows padded to
  T. On CUDA each such session replays CUDA graphs (`enable_cuda_graph`), one per ping-pong direction
  (`gpu_graph_id`): a graph needs fixed shapes at fixed device addresses. Anything larger (a prompt, B > 32) runs on
  one more session without fixed sizes and without graphs.
- Growing buffers (the default on CPU): S follows the longest sequence of the bucket (`reserve`), every run takes
  that one session without fixed sizes, and T is not padded. A CPU forward costs by its work: attending over the
  whole `capacity` (the model's context + tree room) where a few hundred columns hold tokens cost several times more.

The caller (kv.py) decides which sequence lives in which buffer row and which columns each token uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from draft_service.export import DIMS, ROW_FIELDS, ExportMeta, io_names

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DEVICES = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}  # OrtValue device names
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TREE_ROOM = 512  # buffer columns past the context for a tree's nodes (a tree that needs more ends early)
COLUMN_STEP = 16  # growing buffers: widths are multiples of this (a resize every few steps, not every step)


def choose_provider(provider: str = "auto") -> str:
    """auto: CUDA when this onnxruntime build has it, else CPU; cpu / cuda (or ORT's name of either): that one or an
    error. Returns ORT's name."""
    available = ort.get_available_providers()
    if provider == "auto":
        return PROVIDERS["cuda"] if PROVIDERS["cuda"] in available else PROVIDERS["cpu"]
    name = PROVIDERS.get(provider, provider)
    if name not in PROVIDERS.values():
        raise ValueError(f"provider must be auto, cpu or cuda, got {provider!r}")
    if name not in available:
        raise ValueError(f"{name} is not in this onnxruntime build (available: {available})")
    return name


def choose_dtype(dtype: str, provider: str) -> str:
    """auto: float16 on the CUDA provider (half the KV bytes, tensor cores), float32 on CPU (ORT's CPU kernels
    are fp32 first); float32 / float16: as given. provider: an ORT provider name, as choose_provider returns."""
    if dtype != "auto":
        return dtype
    return "float16" if provider == PROVIDERS["cuda"] else "float32"


def bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= n, or None past the largest."""
    return next((b for b in buckets if b >= n), None)


@dataclass
class _BatchBuffers:
    """The two KV buffer sets of one batch bucket; `current` holds the latest written. `holders` says, per row,
    whose committed tokens it holds and how many (kept by the KV store; with the buffers, so that every user of this
    runner sees when another took a row)."""

    sets: tuple[list[ort.OrtValue], list[ort.OrtValue]]  # per set: key0, value0, key1, ... [B, Hkv, S, D]
    holders: list[tuple[object, int] | None]
    current: int = 0

    @property
    def columns(self) -> int:
        return self.sets[0][0].shape()[2]


@dataclass
class _Bucket:
    """The fixed inputs and outputs of one (B, T) session, and its bindings per ping-pong direction."""

    session: ort.InferenceSession
    rows: ort.OrtValue  # [B, T, W] int64
    topk: ort.OrtValue  # [B, T, 2, K] float32
    bindings: dict[int, ort.IOBinding] = field(default_factory=dict)  # by the set read
    ran: set[int] = field(default_factory=set)  # directions run once (on CUDA: captured)


class DraftRunner:
    """rows [B, T, W] -> top-K [B, T, 2, K]; the KV stays in this runner's buffers."""

    def __init__(self, onnx_path: str | Path, meta: ExportMeta, provider: str = "auto", capacity: int = 0,
                 ancestors: int = 65, threads: int = 0, fixed_buffers: bool | None = None,
                 cuda_graphs: bool | None = None) -> None:
        """capacity: the most columns a buffer holds (0: the model's context + TREE_ROOM); fixed_buffers,
        cuda_graphs: None for the provider's default (both on CUDA, neither on CPU; tests run fixed buffers on CPU)."""
        self.meta = meta
        self.onnx_path = str(onnx_path)
        self.provider = choose_provider(provider)
        self.device = DEVICES[self.provider]
        self.dtype = np.dtype(meta.dtype)
        self.capacity = capacity or meta.max_context + TREE_ROOM
        self.width = ROW_FIELDS + ancestors  # W: a row's fields, then the visible ancestor columns
        on_cuda = self.provider == PROVIDERS["cuda"]
        self.fixed_buffers = on_cuda if fixed_buffers is None else fixed_buffers
        self.cuda_graphs = on_cuda and self.fixed_buffers if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not (on_cuda and self.fixed_buffers):
            raise ValueError("cuda_graphs needs the CUDA provider and fixed buffers")
        self.threads = threads
        if on_cuda and hasattr(ort, "preload_dlls"):
            # cuBLAS / cuDNN from the nvidia-* wheels: without torch imported first (a cached start imports none),
            # ORT finds them only when asked to.
            ort.preload_dlls()
        self.input_names, self.output_names = io_names(meta.num_layers)
        self.flexible = ort.InferenceSession(self.onnx_path, sess_options=self._options(),
                                             providers=[self.provider])
        self.buffers: dict[int, _BatchBuffers] = {}
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        # First runs of a (batch, tokens) bucket in one direction: a CUDA graph capture on CUDA, the new session's
        # first run on CPU. Either costs many steps' time once.
        self.cold_runs = 0
        self.run_options = {}
        for direction in (0, 1):
            options = ort.RunOptions()
            if self.cuda_graphs:
                options.add_run_config_entry("gpu_graph_id", str(direction))
            self.run_options[direction] = options

    @property
    def backend(self) -> str:
        buffers = "+static" if self.fixed_buffers else "+growing"
        return f"onnxruntime:{self.provider}{buffers}" + ("+cudagraph" if self.cuda_graphs else "")

    @property
    def last_column(self) -> int:
        """The last column a token may use: the one after it is the trash column of the widest buffers."""
        return self.capacity - 2

    def padding_rows(self, batch: int, tokens: int) -> np.ndarray:
        """[B, T, W] rows that change nothing: token 0 at position 0, writing and seeing only the trash column."""
        rows = np.full((batch, tokens, self.width), self._buffers(batch).columns - 1, dtype=np.int64)
        rows[..., :2] = 0
        rows[..., 3] = 0
        return rows

    def holders(self, batch: int) -> list[tuple[object, int] | None]:
        """Per row of a batch bucket's buffers: (the session whose tokens it holds, how many), or None."""
        return self._buffers(batch).holders

    def reserve(self, batch: int, last_column: int, shrink: bool = False) -> None:
        """Growing buffers: make the batch bucket's buffers hold columns 0..last_column and a trash column after
        them. shrink: also cut buffers more than twice as wide as that (rows holding longer sequences forget them:
        those are recomputed if they come back). A resize copies the buffers once, as a forward does; a forward
        copies all their columns. Fixed buffers hold every column up to `last_column` already."""
        if self.fixed_buffers:
            return
        if last_column > self.last_column:
            raise ValueError(f"column {last_column} is past the buffers' capacity of {self.capacity}")
        buffers = self._buffers(batch)
        need = last_column + 2
        if need <= buffers.columns and not (shrink and buffers.columns > 2 * need + COLUMN_STEP):
            return
        columns = min(self.capacity, -(-need // COLUMN_STEP) * COLUMN_STEP)
        keep = min(columns - 1, buffers.columns - 1)  # the old trash column is garbage
        for s, values in enumerate(buffers.sets):
            for i, value in enumerate(values):
                array = np.zeros((batch, self.meta.num_kv_heads, columns, self.meta.head_dim), dtype=self.dtype)
                if s == buffers.current:
                    array[:, :, :keep] = value.numpy()[:, :, :keep]
                values[i] = ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)
        for r, entry in enumerate(buffers.holders):
            if entry is not None and entry[1] > keep:
                buffers.holders[r] = None

    def run(self, rows: np.ndarray) -> np.ndarray:
        """One forward; rows [B, T, W] with B a batch bucket or above the largest. Returns top-K [B, T, 2, K]."""
        B, T, W = rows.shape
        if W != self.width:
            raise ValueError(f"rows have {W} fields, this runner {self.width}")
        buffers = self._buffers(B)
        read = buffers.current
        padded = bucket(T, TOKEN_BUCKETS)
        if not self.fixed_buffers or B not in BATCH_BUCKETS or padded is None:
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
            columns = self.capacity if self.fixed_buffers else min(self.capacity, 2 * COLUMN_STEP)
            shape = (batch, self.meta.num_kv_heads, columns, self.meta.head_dim)  # [B, Hkv, S, D]
            # One array each: on the CPU provider an OrtValue wraps its array's memory instead of copying it.
            sets = tuple([ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self.dtype), self.device, 0)
                          for _ in range(2 * self.meta.num_layers)] for _ in range(2))
            buffers = self.buffers[batch] = _BatchBuffers(sets, [None] * batch)
        return buffers

    def _bucket(self, batch: int, tokens: int) -> _Bucket:
        b = self.buckets.get((batch, tokens))
        if b is None:
            options = self._options()
            for name, size in zip(DIMS, (batch, tokens, self.capacity, self.width)):
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
        # ORT's idle threads spin after each run by default, taking the CPU from a verifier beside them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def warm(self, batches: tuple[int, ...] = (1,)) -> None:
        """Run (on CUDA: capture) every token bucket of these batch buckets in both directions, with rows that
        write only the trash column: serving then finds those graphs ready."""
        for batch in batches:
            for tokens in TOKEN_BUCKETS:
                for _ in range(2):
                    self.run(self.padding_rows(batch, tokens))
