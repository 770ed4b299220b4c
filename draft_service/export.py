"""Export a transformers causal LM to ONNX for tree drafting, cached by content hash.

Each sequence's KV lives in a buffer of S columns that the graph writes in place (nothing grows: on CUDA the runner
replays captured graphs, which need fixed shapes at fixed addresses). The graph builds the tree mask itself from one
small row per token and ends in softmax + top-K, so only K probabilities and ids per token leave the device:

    rows             [B, T, 4 + A]     int64: token id, position, KV column to write, visible prefix (columns
                                       0..prefix-1), then A more visible columns (the node's tree ancestors)
    past.{l}.key     [B, Hkv, S, D]    one pair per decoder layer
    past.{l}.value   [B, Hkv, S, D]
 -> topk             [B, T, 2, K]      float32: probabilities (descending), then the token ids (exact below 2^24)
    present.{l}.key  [B, Hkv, S, D]    past, with each row's KV written at its column
    present.{l}.value[B, Hkv, S, D]

The cache lives in $CAST_CACHE_DIR/onnx/<hash>/ (default ~/.cache/cast-serve), the hash covering the checkpoint
files, K, dtype and the exporter's versions. A hit reads one small JSON file and imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from cast_runtime.cache import default_cache_dir

# Bump when the graph's interface or the wrapper changes: old cache entries then miss.
EXPORT_FORMAT = 3  # 2: RMSNorm in the form ONNX Runtime fuses; 3: the rows graph only
DTYPES = ("float32", "float16")
# The graph's symbolic sizes, by name: the runner may fix them per session (ONNX Runtime's free dimension
# overrides), so that every shape is known and the shape arithmetic folds away.
DIMS = ("batch", "new", "capacity", "width")
ROW_FIELDS = 4  # token id, position, KV column, visible prefix; the ancestor columns follow
MODEL_FILE = "model.onnx"
META_FILE = "meta.json"


@dataclass(frozen=True)
class ExportMeta:
    """What the runner needs to know about an exported graph (saved next to it as meta.json)."""

    model_dir: str
    top_k: int
    dtype: str           # of the KV cache and the mask; probs are always float32
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int     # the model's max_position_embeddings
    export_seconds: float


def export_key(model_dir: str | Path, top_k: int, dtype: str) -> str:
    """Content hash of everything that shapes the graph: checkpoint files, K, dtype, exporter versions."""
    h = hashlib.sha256()
    shape = {"format": EXPORT_FORMAT, "top_k": top_k, "dtype": dtype, **_exporter_versions()}
    h.update(json.dumps(shape).encode())
    root = Path(model_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:24]


def _exporter_versions() -> dict[str, str]:
    # Versions from package metadata, so that a cache hit never imports torch.
    return {name: metadata.version(name) for name in ("torch", "transformers", "onnx", "onnxscript")}


def export_draft(
    model_dir: str | Path,
    top_k: int = 8,
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    verify: bool = True,
) -> tuple[Path, ExportMeta]:
    """Return (path of model.onnx, meta) for the checkpoint, exporting it on a cache miss."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    out_dir = Path(cache_dir or default_cache_dir()) / "onnx" / export_key(model_dir, top_k, dtype)
    if (out_dir / META_FILE).exists():
        return out_dir / MODEL_FILE, load_meta(out_dir)

    # Export into a private directory, then rename: a crash or a concurrent export never leaves half a cache entry.
    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        meta = _export(Path(model_dir), tmp_dir, top_k, dtype)
        if verify:
            check_export(model_dir, tmp_dir / MODEL_FILE, meta)
        (tmp_dir / META_FILE).write_text(json.dumps(asdict(meta), indent=2))
        try:
            tmp_dir.rename(out_dir)
        except OSError:  # another process finished the same export first: use theirs
            shutil.rmtree(tmp_dir, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir / MODEL_FILE, load_meta(out_dir)


def load_meta(onnx_dir: str | Path) -> ExportMeta:
    return ExportMeta(**json.loads((Path(onnx_dir) / META_FILE).read_text()))


def _load_model(model_dir: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    # sdpa takes the additive 4D mask as-is; eager would too, but sdpa is what the model runs with elsewhere.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.eval()


def _model_dims(config) -> dict[str, int]:
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return {
        "num_layers": text.num_hidden_layers,
        "num_kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        "head_dim": head_dim,
        "vocab_size": text.vocab_size,
        "max_context": getattr(text, "max_position_embeddings", 0) or 0,
    }


def _cache_arg(model) -> str:
    """The forward's cache argument: transformers renamed `past_key_values` to `cache` (5.2x); older 5.x still run."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _wrapper(model, top_k: int):
    """The module that is exported: rows and KV buffers in, top-K and the written buffers out (module docstring)."""
    import torch
    from transformers import DynamicCache

    cache_arg = _cache_arg(model)
    hidden = torch.finfo(model.dtype).min  # finite: a row never sees nothing (softmax of all -inf is NaN)

    def write_in_place(layer, columns):
        """layer.update that writes the new keys and values at their columns instead of appending them."""
        def update(key_states, value_states, *args, **kwargs):
            index = columns[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[3])  # [B, Hkv, T, D]
            layer.keys = layer.keys.scatter(2, index, key_states)
            layer.values = layer.values.scatter(2, index, value_states)
            return layer.keys, layer.values
        return update

    class TopKDraft(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.top_k = top_k

        def forward(self, rows, *past):
            # rows [B, T, 4 + A]; past: key0, value0, key1, value1, ...  each [B, Hkv, S, D]
            ids, positions, columns, prefix = (rows[..., i] for i in range(ROW_FIELDS))  # [B, T] each
            ancestors = rows[..., ROW_FIELDS:]                                            # [B, T, A]
            capacity = past[0].shape[2]
            seen = torch.arange(capacity) < prefix[..., None]                             # [B, T, S]
            marks = torch.zeros(seen.shape, dtype=torch.float32).scatter(2, ancestors, 1.0)
            mask = torch.where(seen | (marks > 0), 0.0, hidden).to(past[0].dtype)[:, None]  # [B, 1, T, S]
            cache = DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)])
            for layer in cache.layers:
                layer.update = write_in_place(layer, columns)
            out = self.model(
                input_ids=ids,
                position_ids=positions,
                attention_mask=mask,
                use_cache=True,
                **{cache_arg: cache},
            )
            probs = torch.softmax(out.logits.float(), dim=-1)  # [B, T, V]
            topk = torch.topk(probs, self.top_k, dim=-1)        # [B, T, K]
            presents = []
            for layer in cache.layers:
                presents += [layer.keys, layer.values]          # [B, Hkv, S, D]
            # One output for both halves of the top-K: one copy to the host instead of two.
            return (torch.stack([topk.values, topk.indices.float()], dim=2), *presents)  # [B, T, 2, K]

    return TopKDraft().eval()


@contextlib.contextmanager
def fusable_rms_norms(model):
    """Every RMSNorm module of model computes x / sqrt(mean(x^2) + eps) while exported, instead of transformers'
    x * rsqrt(...): ONNX Runtime fuses that form into one SimplifiedLayerNormalization node, where the rsqrt form
    stays 7 nodes (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul). On the CUDA provider a draft forward is
    launch-bound (~160 nodes for a 2-layer model), so every node counts. Same function, other rounding."""
    import torch

    def divide_form(norm):
        def forward(hidden):
            x = hidden.float()
            x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            return norm.weight * x.to(hidden.dtype)
        return forward

    patched = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")]
    for norm in patched:
        norm.forward = divide_form(norm)
    try:
        yield len(patched)
    finally:
        for norm in patched:
            del norm.forward  # back to the class's forward


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past.{l}.{kv}" for l in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{l}.{kv}" for l in range(num_layers) for kv in ("key", "value")]
    return ["rows", *past], ["topk", *present]


@dataclass
class SampleTree:
    """A tree-shaped input with past KV, as the graph takes it (feeds) and as a plain forward over a growing cache
    takes it (the other fields: the tests' reference)."""

    feeds: dict[str, np.ndarray]   # rows [B, T, W] and past.{l}.key/value [B, Hkv, S, D]
    input_ids: np.ndarray          # [B, T]
    position_ids: np.ndarray       # [B, T]
    attention_mask: np.ndarray     # [B, 1, T, P+T] additive
    past: list[np.ndarray]         # key0, value0, key1, ... [B, Hkv, P, D]


def sample_tree(dims: dict[str, int], dtype: str, batch: int = 2, capacity: int = 12, past_len: int = 3,
                new: int = 4, ancestors: int = 3, seed: int = 0) -> SampleTree:
    """Each sequence: `past_len` committed tokens, then a root and a binary tree whose nodes see only their ancestors;
    node i at column past_len + i, the buffers' other columns random. Sizes >= 2 everywhere: the exporter
    specialises dims it sees as 0 or 1."""
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(dtype)
    parents = [-1] + [(i - 1) // 2 for i in range(1, new)]  # 1 <- 0, 2 <- 0, 3 <- 1, ...
    depth = [0] * new
    visible = np.zeros((new, new), dtype=bool)  # [T, T] the tree part of the mask
    for i, p in enumerate(parents):
        if p >= 0:
            depth[i] = depth[p] + 1
            visible[i] = visible[p]
        visible[i, i] = True
    if visible.sum(1).max() > ancestors:
        raise ValueError(f"a tree of {new} nodes needs rows of {visible.sum(1).max()} ancestors, not {ancestors}")
    ids = rng.integers(0, dims["vocab_size"], size=(batch, new), dtype=np.int64)
    positions = np.tile(past_len + np.array(depth, dtype=np.int64), (batch, 1))
    mask = np.full((batch, 1, new, past_len + new), np.finfo(np_dtype).min, dtype=np_dtype)
    mask[:, :, :, :past_len] = 0.0
    mask[:, :, :, past_len:][:, :, visible] = 0.0
    columns = past_len + np.arange(new)
    rows = np.zeros((batch, new, ROW_FIELDS + ancestors), dtype=np.int64)
    rows[..., 0], rows[..., 1], rows[..., 2], rows[..., 3] = ids, positions, columns, past_len
    for i in range(new):
        seen = columns[visible[i]]
        rows[:, i, ROW_FIELDS:] = columns[i]  # padding: the node's own column again
        rows[:, i, ROW_FIELDS : ROW_FIELDS + seen.size] = seen
    feeds, past = {"rows": rows}, []
    for l in range(dims["num_layers"]):
        for kv in ("key", "value"):
            buffer = rng.standard_normal((batch, dims["num_kv_heads"], capacity, dims["head_dim"])).astype(np_dtype)
            feeds[f"past.{l}.{kv}"] = buffer
            past.append(buffer[:, :, :past_len].copy())
    return SampleTree(feeds, ids, positions, mask, past)


def _export(model_dir: Path, out_dir: Path, top_k: int, dtype: str) -> ExportMeta:
    import torch

    t0 = time.perf_counter()
    model = _load_model(model_dir, dtype)
    dims = _model_dims(model.config)
    if top_k > dims["vocab_size"]:
        raise ValueError(f"top_k {top_k} exceeds the vocabulary ({dims['vocab_size']})")
    if dims["vocab_size"] > 2**24:
        raise ValueError(f"the graph returns token ids as float32: a vocabulary of {dims['vocab_size']} is past its "
                         "exact integers")
    inputs, outputs = io_names(dims["num_layers"])
    feeds = sample_tree(dims, dtype).feeds
    batch, new, capacity, width = (torch.export.Dim(n) for n in DIMS)
    # *past arrives as one tuple: its shapes go in one nested tuple.
    kv = tuple({0: batch, 2: capacity} for _ in range(2 * dims["num_layers"]))
    args = tuple(torch.from_numpy(feeds[name]) for name in inputs)
    with torch.no_grad(), warnings.catch_warnings(), fusable_rms_norms(model), quiet_exporter_logs():
        # The exporter warns that axes sharing a Dim keep one name, and about its own deprecations: noise here.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            _wrapper(model, top_k),
            args,
            dynamo=True,
            dynamic_shapes=({0: batch, 1: new, 2: width}, kv),
            input_names=inputs,
            output_names=outputs,
            optimize=True,
            verbose=False,
        )
    program.save(str(out_dir / MODEL_FILE))
    return ExportMeta(
        model_dir=str(Path(model_dir).resolve()),
        top_k=top_k,
        dtype=dtype,
        export_seconds=round(time.perf_counter() - t0, 3),
        **dims,
    )


@contextlib.contextmanager
def quiet_exporter_logs():
    """Errors only from the exporter: its optimizer logs each rewrite at INFO, and torch warns that torchvision is
    not installed (its operators are not needed here); a first start printed hundreds of lines."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_export(model_dir: str | Path, onnx_path: str | Path, meta: ExportMeta, atol: float = 1e-4) -> None:
    """Run the exported module in torch and the graph in ONNX Runtime (CPU) on a tree-shaped input with past KV;
    raise unless top-K probabilities and KV are within atol (fp32; fp16 gets a looser bound) and the ids equal, but
    where probabilities tie within that bound (each top-K breaks ties its own way)."""
    import onnxruntime as ort
    import torch

    model = _load_model(Path(model_dir), meta.dtype)
    feeds = sample_tree(_model_dims(model.config), meta.dtype, seed=1).feeds
    inputs, _ = io_names(meta.num_layers)
    with torch.no_grad():
        want_topk, *want_kv = _wrapper(model, meta.top_k)(*(torch.from_numpy(feeds[n]) for n in inputs))
    topk, *kv = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)
    tol = atol if meta.dtype == "float32" else 1e-2
    want_topk = want_topk.numpy()
    if not np.allclose(topk[:, :, 0], want_topk[:, :, 0], atol=tol):
        worst = np.abs(topk[:, :, 0] - want_topk[:, :, 0]).max()
        raise RuntimeError(f"ONNX export check: top-K probs differ from PyTorch by {worst:.2e}")
    probs = want_topk[:, :, 0]                                        # [B, T, K]
    tied = np.zeros(probs.shape, dtype=bool)
    close = np.abs(np.diff(probs, axis=-1)) <= tol                    # [B, T, K-1] ranks k and k+1 tie
    tied[..., 1:] |= close
    tied[..., :-1] |= close
    if ((topk[:, :, 1] != want_topk[:, :, 1]) & ~tied).any():
        raise RuntimeError("ONNX export check: top-K ids differ from PyTorch")
    for want, have in zip(want_kv, kv):
        if not np.allclose(have, want.numpy(), atol=tol * 10):
            raise RuntimeError("ONNX export check: present KV differs from PyTorch")
