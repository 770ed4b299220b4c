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
- One copy of the weights: where there are bucket sessions (up to 42), the runner loads the graph's weights once,
  on its device, and every session uses them in place (`SessionOptions.add_initializer`) instead of loading its own
  copy; so a large model (a sparse level of an 8B target: ~9 GB) gets CUDA graphs too.
- Growing buffers (the default on CPU): S follows the longest sequence of the bucket (`reserve`), every run takes
  that one session without fixed sizes, and T is not padded. A CPU forward costs by its work: attending over the
  whole `capacity` (the model's context + tree room) where a few hundred columns hold tokens cost several times more.
  Their memory is reserved once, at `max_batch` rows of `capacity` columns per set, layer and key/value, written
  through so that it is resident from the start; every batch bucket up to `max_batch` is a view of its first
  B x Hkv x S x D values. Buckets share that memory, so a bucket that writes it voids the rows of the one before
  (those sequences are recomputed if they come back). A larger bucket gets memory of its own on first use.

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
MAX_FORWARD_ROWS = 256  # rows (sequences x tokens) of one forward at most: a prompt runs as several
COLUMN_STEP = 16  # growing buffers: widths are multiples of this (a resize every few steps, not every step)
# Initializers this large or larger are the weights that sessions share (load_weights). Smaller ones (shape
# constants) stay each session's own: a CUDA session keeps some of them in CPU memory, where ORT would not take a
# copy on the GPU (it warns and loads its own), and their copies cost nothing.
SHARED_MIN_BYTES = 1024


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
    arrays: tuple[list[np.ndarray], list[np.ndarray]] = ((), ())  # growing buffers: the arrays the sets wrap

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


def load_weights(onnx_path: str | Path, device: str) -> dict[str, ort.OrtValue]:
    """The graph's initializers of SHARED_MIN_BYTES or more, read once (export.py saves them inside model.onnx, or
    beside it as external data past 2 GB: read one tensor at a time), as OrtValues on `device` ("cpu" or "cuda")
    for SessionOptions.add_initializer. A session uses such a value in place where it lies on the device that the
    session plans for it, else it warns and loads its own copy (onnxruntime/core/framework/session_state_utils.cc,
    SaveInitializedTensors)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    weights = {}
    for tensor in model.graph.initializer:
        if np.prod(tensor.dims) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize < SHARED_MIN_BYTES:
            continue
        array = numpy_helper.to_array(tensor, base_dir=str(Path(onnx_path).parent))
        # On CPU the OrtValue wraps the array (and keeps it). On CUDA ortvalue_from_numpy copies it into memory that
        # ORT owns, which add_initializer refuses (a session only borrows what it is given): the sessions get a
        # DLPack view of that copy instead, which keeps the copy alive.
        value = ort.OrtValue.ortvalue_from_numpy(array, device, 0)
        weights[tensor.name] = value if device == "cpu" else ort.OrtValue.from_dlpack(value)
    return weights


class DraftRunner:
    """rows [B, T, W] -> top-K [B, T, 2, K]; the KV stays in this runner's buffers."""

    def __init__(self, onnx_path: str | Path, meta: ExportMeta, provider: str = "auto", capacity: int = 0,
                 ancestors: int = 65, threads: int = 0, fixed_buffers: bool | None = None,
                 cuda_graphs: bool | None = None, max_rows: int = MAX_FORWARD_ROWS, max_batch: int = 16) -> None:
        """capacity: the most columns a buffer holds (0: the model's context + TREE_ROOM); fixed_buffers,
        cuda_graphs: None for the provider's default (both on CUDA, neither on CPU; tests run fixed buffers on CPU);
        max_rows: the most rows (sequences x tokens) one forward takes (run); max_batch: growing buffers reserve
        memory for this many sequences at `capacity` columns at start (module docstring)."""
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
        # Sessions per (batch, tokens) bucket: on CUDA for the graphs only; on CPU (fixed buffers: tests) always.
        self.bucket_sessions = self.fixed_buffers and (self.cuda_graphs or not on_cuda)
        self.threads = threads
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        # Rounded up to its batch bucket, as BufferKV rounds a call's batch (past the largest: a multiple of it).
        self.max_batch = bucket(max_batch, BATCH_BUCKETS) or -(-max_batch // BATCH_BUCKETS[-1]) * BATCH_BUCKETS[-1]
        if on_cuda and hasattr(ort, "preload_dlls"):
            # cuBLAS / cuDNN from the nvidia-* wheels: without torch imported first (a cached start imports none),
            # ORT finds them only when asked to.
            ort.preload_dlls()
        self.input_names, self.output_names = io_names(meta.num_layers)
        # One copy of the weights for all sessions (module docstring); a lone flexible session loads its own.
        self.weights = load_weights(self.onnx_path, self.device) if self.bucket_sessions else {}
        self.flexible = ort.InferenceSession(self.onnx_path, sess_options=self._options(),
                                             providers=[self.provider])
        self.buffers: dict[int, _BatchBuffers] = {}
        # Growing buffers: per set, per layer key/value, flat memory that the batch buckets view; who wrote it last.
        self.storage: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        self.storage_user: dict[int, int] = {}
        if not self.fixed_buffers:
            self._storage(self.max_batch)
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
        # The latest KV moves to the other set's memory, laid out at the new width; that set becomes the current.
        read, write = buffers.current, 1 - buffers.current
        new = self._views(batch, columns)
        for old, array in zip(buffers.arrays[read], new[write]):
            array[:, :, :keep] = old[:, :, :keep]
        buffers.arrays = new
        buffers.sets = tuple([ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for a in arrays] for arrays in new)
        buffers.current = write
        for r, entry in enumerate(buffers.holders):
            if entry is not None and entry[1] > keep:
                buffers.holders[r] = None

    def run(self, rows: np.ndarray) -> np.ndarray:
        """rows [B, T, W] with B a batch bucket or above the largest. Returns top-K [B, T, 2, K].

        One forward, or several over slices of T of at most `max_rows` rows each (B x T): a forward's working
        memory (logits [B, T, V], masks and attention [B, T, S]) grows with its rows, and ONNX Runtime's arena
        keeps the most it ever needed. A slice sees the columns that the slices before it wrote, as a token sees
        those of the tokens before it, and a tree node sees only its ancestors' columns, not its layer's.
        """
        B, T, W = rows.shape
        if W != self.width:
            raise ValueError(f"rows have {W} fields, this runner {self.width}")
        step = max(1, self.max_rows // B)
        if T <= step:
            return self._run_once(rows)
        # copy: a bucket session's top-K is one preallocated output, which the next slice's run overwrites
        return np.concatenate([self._run_once(rows[:, t : t + step]).copy() for t in range(0, T, step)], axis=1)

    def _run_once(self, rows: np.ndarray) -> np.ndarray:
        B, T, _ = rows.shape
        buffers = self._buffers(B)
        read = buffers.current
        padded = bucket(T, TOKEN_BUCKETS)
        if not self.bucket_sessions or B not in BATCH_BUCKETS or padded is None:
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
        if buffers is None and self.fixed_buffers:
            shape = (batch, self.meta.num_kv_heads, self.capacity, self.meta.head_dim)  # [B, Hkv, S, D]
            # One array each: on the CPU provider an OrtValue wraps its array's memory instead of copying it.
            sets = tuple([ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self.dtype), self.device, 0)
                          for _ in range(2 * self.meta.num_layers)] for _ in range(2))
            buffers = self.buffers[batch] = _BatchBuffers(sets, [None] * batch)
        elif buffers is None:
            arrays = self._views(batch, min(self.capacity, 2 * COLUMN_STEP))
            sets = tuple([ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for a in views] for views in arrays)
            buffers = self.buffers[batch] = _BatchBuffers(sets, [None] * batch, arrays=arrays)
        if not self.fixed_buffers:
            rows = self._storage_rows(batch)
            if self.storage_user.get(rows, batch) != batch:  # another bucket wrote this memory since: rows void
                buffers.holders[:] = [None] * batch
            self.storage_user[rows] = batch
        return buffers

    def _storage_rows(self, batch: int) -> int:
        return self.max_batch if batch <= self.max_batch else batch

    def _storage(self, rows: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Flat memory for `rows` sequences at `capacity` columns, per set and layer key/value: written through when
        reserved (rows == max_batch), so that serving never adds to it; else touched as buffers use it."""
        storage = self.storage.get(rows)
        if storage is None:
            size = rows * self.meta.num_kv_heads * self.capacity * self.meta.head_dim
            storage = self.storage[rows] = tuple(
                [np.zeros(size, dtype=self.dtype) for _ in range(2 * self.meta.num_layers)] for _ in range(2))
            if rows == self.max_batch:
                for flat in (f for flats in storage for f in flats):
                    flat.fill(0)  # np.zeros maps its pages on first write: write them now
        return storage

    def _views(self, batch: int, columns: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per set, per layer key/value: [B, Hkv, columns, D] arrays over the first values of the storage."""
        shape = (batch, self.meta.num_kv_heads, columns, self.meta.head_dim)
        size = int(np.prod(shape))
        return tuple([flat[:size].reshape(shape) for flat in flats] for flats in self._storage(self._storage_rows(batch)))

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
        for name, value in self.weights.items():
            options.add_initializer(name, value)
        if self.weights and self.device == "cpu":
            # ORT's CPU MatMul re-lays its weight out into memory of its own session (prepacking): a copy per session
            # again. ORT shares prepacked weights only through a container that its Python API does not offer.
            options.add_session_config_entry("session.disable_prepacking", "1")
        return options

    def warm_memory(self) -> None:
        """Growing buffers: the largest forwards (`max_rows` rows, over one sequence and over `max_batch`) at the full
        width, with rows that write only the trash column, so that ORT's arena holds what serving will ever ask of
        it before serving starts. The next call narrows the buffers again."""
        for batch in (self.max_batch, 1):
            self.reserve(batch, self.last_column)
            self.run(self.padding_rows(batch, max(1, self.max_rows // batch)))

    def warm(self, batches: tuple[int, ...] = (1,)) -> None:
        """Run (on CUDA: capture) every token bucket of these batch buckets in both directions, with rows that
        write only the trash column: serving then finds those graphs ready."""
        for batch in batches:
            for tokens in TOKEN_BUCKETS:
                for _ in range(2):
                    self.run(self.padding_rows(batch, tokens))
