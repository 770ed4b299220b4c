"""The verifier's tree forward over the KV store (kv_cache.py); on CUDA in fixed shapes per bucket, so that a CUDA
graph can replay it.

- Rows are slots: row r of the forward is slot r of the store, for r < B, B = the highest slot of the batch + 1
  (on CUDA: the smallest batch bucket at or above it). A slot in those rows that is not in the batch (another
  live sequence, or no sequence) is a dummy row: token 0 at position 0, seeing only itself; its output is ignored.
- Every row writes its N new entries (the largest tree's size; on CUDA its token bucket) at the scratch columns
  [W, W + N) and attends to [0, W + N): W is the longest length in those rows (on CUDA the context bucket at or
  above it), so no row overwrites a committed entry, and KVStore.keep moves the accepted ones from W + node to
  P_b + j. (W = max_context would make every step attend to the whole context limit.)
- Row b's node i sees the columns [0, P_b) and its ancestors in the scratch region (static_mask).

So on CUDA one (B, N, W) key has one set of shapes and one set of Python-level constants (the KV slices); each key
used is captured once as a torch.cuda.CUDAGraph (all sharing one memory pool) and replayed: copy the inputs into
static device buffers, replay, read the logits from a static output buffer. The inputs go as one byte buffer (ids,
positions, prefix lengths, ancestor masks) in one host-to-device copy; the mask is built inside the graph. On the
CPU the same code runs eagerly, in the batch's own sizes: with no graph to replay, rounding up would only add work.

Graph memory: the pool is shared, so captured graphs cost about the largest one's activations, not their sum;
the logits of all keys live in one flat buffer of S * T * V elements (each key's [B, N, V] is a prefix of it).
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cast_core.tree import TokenTree
from verify_service.fused_llama import MASK_ALIGN
from verify_service.kv_cache import KVStore, SequenceKV
from verify_service.target import TargetModel

log = logging.getLogger("verify_service")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
MIN_CONTEXT_BUCKET = 64  # then powers of two up to max_context: a step attends to at most twice its context
WARMUP_RUNS = 2  # eager runs on a side stream before a capture (cuBLAS handles, workspaces)


def buckets(standard: Sequence[int], limit: int) -> tuple[int, ...]:
    """The standard sizes below limit, then limit itself."""
    return (*[b for b in standard if b < limit], limit)


def context_buckets(max_context: int) -> tuple[int, ...]:
    sizes, size = [], MIN_CONTEXT_BUCKET
    while size < max_context:
        sizes.append(size)
        size *= 2
    return (*sizes, max_context)


def bucket_for(value: int, sizes: Sequence[int]) -> int:
    """The smallest size >= value (value <= sizes[-1])."""
    return sizes[bisect.bisect_left(sizes, value)]


def kv_geometry(target: TargetModel) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) from the model's config (GPT-2's names map onto these through its config)."""
    config = target.model.config.get_text_config()
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers), kv_heads, head_dim


def free_memory(device: torch.device) -> int:
    """Bytes free on the device: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def static_store(target: TargetModel, slots: int, max_tree_tokens: int) -> KVStore:
    """The KVStore for target: S = slots, C = max_context + max_tree_tokens, all buffers allocated now.
    It refuses (ValueError) a size that does not fit the free memory, naming the settings to lower."""
    capacity = target.max_context + max_tree_tokens
    layers, kv_heads, head_dim = kv_geometry(target)
    element = torch.empty((), dtype=target.dtype).element_size()
    need = 2 * layers * slots * kv_heads * capacity * head_dim * element
    free = free_memory(target.device)
    if need > 0.9 * free:
        raise ValueError(
            f"the KV store needs {need / 2**30:.1f} GiB ({slots} slots x {capacity} columns = max_context "
            f"{target.max_context} + max_tree_tokens {max_tree_tokens}) but {free / 2**30:.1f} GiB are free: lower "
            f"--max-context or --max-batch"
        )
    return KVStore(layers, slots, kv_heads, capacity, head_dim, target.dtype, target.device)


def static_mask(prefix_lengths: torch.Tensor, visible: torch.Tensor, write_at: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, N, W + N] additive mask: row b's node i sees the columns [0, P_b) and the scratch columns W + j with
    visible[b, i, j]. prefix_lengths: [B] int64, visible: [B, N, N] bool, both on the model's device. The rows are
    padded to a multiple of MASK_ALIGN elements in memory (the returned tensor is a view)."""
    b, n, _ = visible.shape
    width = write_at + n
    prefix = torch.arange(write_at, device=visible.device)[None] < prefix_lengths[:, None]  # [B, W]
    seen = torch.cat([prefix[:, None].expand(b, n, write_at), visible], dim=2)  # [B, N, W + N]
    padded = -(-width // MASK_ALIGN) * MASK_ALIGN
    mask = torch.full((b, 1, n, padded), torch.finfo(dtype).min, dtype=dtype, device=visible.device)
    mask[:, 0, :, :width].masked_fill_(seen, 0)
    return mask[..., :width]


class StaticForward:
    """Tree forwards over the KVStore, in buckets; on CUDA each bucket replays a CUDA graph."""

    def __init__(self, target: TargetModel, store: KVStore, max_tree_tokens: int) -> None:
        assert store.context_capacity >= target.max_context + max_tree_tokens
        self.target = target
        self.store = store
        self.max_tree_tokens = max_tree_tokens
        self.batch_buckets = buckets(BATCH_BUCKETS, store.slot_capacity)
        self.token_buckets = buckets(TOKEN_BUCKETS, max_tree_tokens)
        self.context_buckets = context_buckets(target.max_context)
        self.use_graphs = target.device.type == "cuda"
        # Sizes rounded up to the buckets: the fixed shapes a graph replays (tests set it on the CPU, to run them).
        self.bucketed = self.use_graphs
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph | None] = {}  # None: capture failed, eager
        self.capture_failures = 0
        self.captures = 0  # capture attempts: each is a one-time cost in the step that makes it
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.logits: torch.Tensor | None = None  # flat [S * T * V] graph output, allocated at the first capture
        # Inputs of the largest bucket: int64 ids [B*N], positions [B*N], prefix lengths [B], then bool visible
        # [B*N*N]; a smaller bucket uses a prefix. The host copy is pinned on CUDA, so the one copy is asynchronous.
        s, t = store.slot_capacity, max_tree_tokens
        nbytes = 8 * (2 * s * t + s) + s * t * t
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=target.device.type == "cuda")
        self.device_inputs = torch.zeros(nbytes, dtype=torch.uint8, device=target.device)
        self.copied = torch.cuda.Event() if target.device.type == "cuda" else None

    # --- one forward --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def tree_logits(self, kvs: Sequence[SequenceKV], trees: Sequence[TokenTree]) -> list[torch.Tensor]:
        """One forward over all nodes of all trees, tree b on top of kvs[b]: logits [N_b, V] per tree, on the
        model's device. The new entries wait past every sequence's length for KVStore.keep; lengths do not change
        here. With graphs the tensors are views of the static output: read them before the next forward."""
        assert all(kv.store is self.store for kv in kvs)
        rows, n = max(kv.slot for kv in kvs) + 1, max(len(t) for t in trees)
        if n > self.max_tree_tokens:  # the verifier refuses these first, naming the request field
            raise ValueError(f"a tree of {n} nodes exceeds max_tree_tokens {self.max_tree_tokens}")
        if self.bucketed:
            rows, n = bucket_for(rows, self.batch_buckets), bucket_for(n, self.token_buckets)
        write_at = max(kv.length for kv in self.store.owners[:rows])
        if self.bucketed:
            write_at = bucket_for(write_at, self.context_buckets)
        self._stage(kvs, trees, rows, n)
        self.store.begin_verify(kvs, rows, write_at)
        try:
            logits = self._run(rows, n, write_at)  # [rows, n, V]
        finally:
            self.store.end_forward()
        return [logits[kv.slot, : len(t)] for kv, t in zip(kvs, trees, strict=True)]

    def _stage(self, kvs: Sequence[SequenceKV], trees: Sequence[TokenTree], rows: int, n: int) -> None:
        """Fill the host input buffer for a (rows, n) bucket and copy it to the device in one transfer."""
        if self.copied is not None:
            self.copied.synchronize()  # the previous transfer has left the pinned buffer
        ids, positions, lengths, visible = self._views(self.host.numpy(), rows, n)
        ids[:] = 0  # dummy rows and padding nodes: token 0...
        positions[:] = 0  # ...at position 0 (padding nodes of a real row: at P_b, below)
        lengths[:] = 0  # dummy rows see no prefix...
        visible[:] = np.eye(n, dtype=bool)  # ...and only themselves
        for kv, tree in zip(kvs, trees, strict=True):
            r, size = kv.slot, len(tree)
            ids[r, :size] = tree.tokens
            positions[r] = kv.length
            positions[r, :size] += tree.depths
            lengths[r] = kv.length
            visible[r, :size, :size] = tree.ancestor_mask()
        nbytes = self._nbytes(rows, n)
        self.device_inputs[:nbytes].copy_(self.host[:nbytes], non_blocking=True)
        if self.copied is not None:
            self.copied.record(torch.cuda.current_stream(self.target.device))

    @staticmethod
    def _nbytes(rows: int, n: int) -> int:
        return 8 * (2 * rows * n + rows) + rows * n * n

    @staticmethod
    def _views(buffer, rows: int, n: int):
        """(ids [B, N], positions [B, N], prefix lengths [B], visible [B, N, N]) in a byte buffer (numpy or torch)."""
        ints = 2 * rows * n + rows
        int64, boolean = (np.int64, bool) if isinstance(buffer, np.ndarray) else (torch.int64, torch.bool)
        whole, flags = buffer[: 8 * ints].view(int64), buffer[8 * ints : 8 * ints + rows * n * n].view(boolean)
        ids = whole[: rows * n].reshape(rows, n)
        positions = whole[rows * n : 2 * rows * n].reshape(rows, n)
        return ids, positions, whole[2 * rows * n :], flags.reshape(rows, n, n)

    def _forward(self, rows: int, n: int, write_at: int) -> torch.Tensor:
        """The bucket's forward on the staged device inputs: logits [rows, n, V]. What a graph captures."""
        ids, positions, lengths, visible = self._views(self.device_inputs, rows, n)
        mask = static_mask(lengths, visible, write_at, self.target.dtype)  # [rows, 1, n, write_at + n]
        return self.target.forward(self.store, ids, positions, mask)

    def _run(self, rows: int, n: int, write_at: int) -> torch.Tensor:
        key = (rows, n, write_at)
        if not self.use_graphs:
            return self._forward(*key)
        if key not in self.graphs:
            self.captures += 1
            self.graphs[key] = self._capture(*key)
        graph = self.graphs[key]
        if graph is None:
            return self._forward(*key)
        with torch.cuda.device(self.target.device):  # replay launches on the current device's stream
            graph.replay()
        return self._output(*key)

    # --- CUDA graphs --------------------------------------------------------------------------------------------

    def _output(self, rows: int, n: int, write_at: int) -> torch.Tensor:
        vocab = self.logits.numel() // (self.store.slot_capacity * self.max_tree_tokens)
        return self.logits[: rows * n * vocab].view(rows, n, vocab)

    def _capture(self, rows: int, n: int, write_at: int) -> torch.cuda.CUDAGraph | None:
        """Capture the bucket's forward (inputs already staged); None if capture fails: the bucket stays eager.
        The warm-up and capture runs only write scratch columns, so they change no sequence."""
        device = self.target.device
        with torch.cuda.device(device):
            current = torch.cuda.current_stream()
            try:
                side = torch.cuda.Stream()
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_RUNS):
                        logits = self._forward(rows, n, write_at)
                current.wait_stream(side)
                if self.logits is None:
                    size = self.store.slot_capacity * self.max_tree_tokens * logits.shape[-1]
                    self.logits = torch.empty(size, dtype=logits.dtype, device=device)
                del logits
                out = self._output(rows, n, write_at)
                graph = torch.cuda.CUDAGraph()
                # thread_local: another thread's CUDA calls (the gRPC side does none today) cannot break the capture.
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    out.copy_(self._forward(rows, n, write_at))
                return graph
            except Exception as e:  # never crash serving: this bucket runs eagerly from now on
                # A capture that fails inside torch.cuda.graph can leave its capture stream current.
                torch.cuda.set_stream(current)
                self.capture_failures += 1
                level = logging.WARNING if self.capture_failures == 1 else logging.DEBUG
                log.log(level, "CUDA graph capture failed for batch %d x %d tokens, context bucket %d (%s: %s); "
                        "this bucket runs eagerly", rows, n, write_at, type(e).__name__, e)
                try:
                    torch.cuda.synchronize(device)
                except Exception:  # a sticky error would surface again in the eager forward, with its own message
                    pass
                return None

    @torch.no_grad()
    def capture_buckets(self) -> int:
        """Capture every (batch, tokens, context) bucket now, with dummy rows only (they write scratch columns):
        serving then never pays a capture. Before any sequence exists (start-up). Returns the graphs captured."""
        if not self.use_graphs:
            return 0
        assert not self.store.owners, "capture_buckets runs before any sequence holds a slot"
        before = self.captures
        for rows in self.batch_buckets:
            for n in self.token_buckets:
                for write_at in self.context_buckets:
                    if (rows, n, write_at) in self.graphs:
                        continue
                    self._stage([], [], rows, n)
                    self.store.begin_verify([], rows, write_at)
                    try:
                        self._run(rows, n, write_at)
                    finally:
                        self.store.end_forward()
        torch.cuda.synchronize(self.target.device)
        return self.captures - before

    def describe(self) -> str:
        s, c = self.store.slot_capacity, self.store.context_capacity
        mode = "CUDA graphs" if self.use_graphs else "eager"
        forward = "fused" if self.target.fused is not None else "transformers'"
        return (f"KV store: {s} slots x {c} columns ({self.store.nbytes / 2**30:.2f} GiB), trees <= "
                f"{self.max_tree_tokens} tokens; {forward} forward, {mode}")
