"""The target model: loading a local checkpoint, its forward, and the prefill of prompts into the KV store.

The forward is our fused Llama forward (fused_llama.py) for Llama-family models and transformers' own for any
other causal LM; both take the same inputs. Tree attention uses transformers' custom-4D-mask path: a mask of shape
[B, 1, q_len, kv_len] is passed to the attention kernel as-is (transformers skips its own mask construction for
it). It must be additive, in the model's dtype (0 = attend, dtype min = masked): the eager kernel adds the mask to
the scores, so a boolean mask would be silently wrong there. position_ids are always explicit: a node's position
is the cache length plus its depth, which the default (cache length + index) would get wrong.

Prefill: one padded forward over all prompts of a call, whatever their lengths P_b. Rows are padded to N_max
tokens (padding: token 0 at position P_b, seeing only itself); every row's new entries go to the same cache
columns W0 = max P_b onwards, and the columns between P_b and W0 are masked (kv_cache.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cast_runtime.identity import vocab_hash
from verify_service.fused_llama import FusedLlama, build_fused
from verify_service.kv_cache import SequenceKV

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def batch_attention_mask(prefix_lengths: np.ndarray, write_at: int, visible: np.ndarray, dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    """[B, 1, N, write_at + N] additive mask for a prefill batch laid out as kv_cache.py describes.

    prefix_lengths: [B] P_b; write_at: W0 = the column of every row's first new entry (>= max P_b);
    visible: [B, N, N] bool, visible[b, i, j]: new entry j is i itself or one of its ancestors (padding nodes
    see only themselves). Row b's node i sees the columns [0, P_b) and its ancestors at W0 + j; not [P_b, W0).
    """
    b, n, _ = visible.shape
    prefix = torch.arange(write_at, device=device)[None] < torch.from_numpy(prefix_lengths).to(device)[:, None]  # [B, W0]
    seen = torch.cat([prefix[:, None].expand(b, n, write_at), torch.from_numpy(visible).to(device)], dim=2)  # [B, N, W0 + N]
    mask = torch.zeros(b, 1, n, write_at + n, dtype=dtype, device=device)
    return mask.masked_fill_(~seen[:, None], torch.finfo(dtype).min)


def pad_rows(rows: Sequence[np.ndarray], fill: int, width: int = 0) -> np.ndarray:
    """[B, max(max len, width)] int64 from B 1-D arrays, right-padded with `fill`."""
    out = np.full((len(rows), max(width, *(len(r) for r in rows))), fill, dtype=np.int64)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


def padded_visibility(masks: Sequence[np.ndarray], width: int = 0) -> np.ndarray:
    """[B, N, N] bool from B ancestor masks [N_b, N_b], N = max(N_b, width): padding nodes (i >= N_b) see only
    themselves, so no softmax row is empty and their (discarded) outputs stay finite."""
    n = max(width, *(len(m) for m in masks))
    out = np.broadcast_to(np.eye(n, dtype=bool), (len(masks), n, n)).copy()
    for b, m in enumerate(masks):
        out[b, : len(m), : len(m)] = m
    return out


PREFILL_ALIGN = 64  # on CUDA: see TargetModel.prefill_align


@dataclass
class TargetModel:
    model: torch.nn.Module
    model_name: str
    vocab_hash: str
    vocab_size: int
    max_context: int
    device: torch.device
    dtype: torch.dtype
    cache_kwarg: str  # "cache" in transformers >= 5.2x, "past_key_values" before
    takes_logits_to_keep: bool  # most causal LMs can skip the LM head for positions we don't need
    fused: FusedLlama | None = None  # our Llama forward (fused_llama.py); None: transformers' own
    # A prefill's tokens per row are padded to a multiple of this. On CUDA the first forward of each new length
    # costs far more than the next one; padded, a few dozen shapes cover every prompt length.
    prefill_align: int = 1

    @staticmethod
    def load(
        model_dir: str | Path,
        dtype: str = "auto",
        device: str = "auto",
        max_context: int | None = None,
        model_name: str = "",
        fused: bool = True,
        attn_implementation: str | None = None,
    ) -> TargetModel:
        """fused: our fused Llama forward where it applies (its elementwise kernels compiled on CUDA); False keeps
        transformers' own forward, the tests' oracle. attn_implementation: transformers' attention kernel for its
        own forward; None lets transformers choose (sdpa where the model supports it, else eager)."""
        model_dir = Path(model_dir)
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation=attn_implementation)
        model.to(torch_device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        text_config = model.config.get_text_config()
        limit = int(text_config.max_position_embeddings)
        # Our mask gives every layer the full prefix: with a sliding window the target itself would see less,
        # so stay inside the window to remain exact.
        if getattr(text_config, "sliding_window", None):
            limit = min(limit, int(text_config.sliding_window))
        if max_context is not None and max_context > limit:
            raise ValueError(f"max_context: {max_context} exceeds the model's limit of {limit} positions")
        params = inspect.signature(model.forward).parameters
        return TargetModel(
            model=model,
            model_name=model_name or model_dir.resolve().name,
            vocab_hash=vocab_hash(tokenizer.get_vocab()),
            vocab_size=int(text_config.vocab_size),
            max_context=max_context or limit,
            device=torch_device,
            dtype=torch_dtype,
            cache_kwarg="cache" if "cache" in params else "past_key_values",
            takes_logits_to_keep="logits_to_keep" in params,
            fused=build_fused(model, torch_device) if fused else None,
            prefill_align=PREFILL_ALIGN if torch_device.type == "cuda" else 1,
        )

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def attn_implementation(self) -> str:
        """The attention kernel of transformers' forward (the fused forward calls sdpa itself)."""
        return self.model.config._attn_implementation

    @torch.no_grad()
    def prefill(self, kvs: Sequence[SequenceKV], token_ids: Sequence[Sequence[int]]) -> None:
        """Append the KV entries of token_ids[b] (a causal chain at positions kvs[b].length...) to kvs[b]: one
        padded forward for the whole batch. The logits are not needed; the cache is filled as a side effect."""
        rows = [(kv, np.asarray(ids, dtype=np.int64)) for kv, ids in zip(kvs, token_ids, strict=True) if len(ids)]
        if not rows:
            return
        # Rows in slot order: consecutive slots (a call's new sequences, usually) write to views of the buffers.
        rows.sort(key=lambda row: row[0].slot)
        kvs, chains = [kv for kv, _ in rows], [ids for _, ids in rows]
        store = kvs[0].store
        lengths = np.array([kv.length for kv in kvs], dtype=np.int64)  # [B]
        width = -(-max(map(len, chains)) // self.prefill_align) * self.prefill_align
        width = min(width, store.context_capacity - int(lengths.max()))  # the padding's entries must fit too
        tokens = pad_rows(chains, fill=0, width=width)  # [B, N]; padding tokens: 0...
        positions = lengths[:, None] + pad_rows([np.arange(len(c)) for c in chains], fill=0, width=width)  # ...at P_b
        ancestors = [np.tril(np.ones((len(c), len(c)), dtype=bool)) for c in chains]  # a chain's node sees those before
        store.begin_prefill(kvs, tokens.shape[1])
        try:
            visible = padded_visibility(ancestors, width=tokens.shape[1])
            mask = batch_attention_mask(lengths, store.write_at, visible, self.dtype, self.device)  # [B, 1, N, W0 + N]
            self.forward(store, torch.from_numpy(tokens).to(self.device), torch.from_numpy(positions).to(self.device),
                         mask, last_only=True)
        finally:
            store.end_forward()
        store.keep(kvs, [range(len(c)) for c in chains])

    def forward(self, cache, ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor,
                last_only: bool = False) -> torch.Tensor:
        """ids, positions: [B, N]; attention_mask: [B, 1, N, W + N] additive; cache: the KVStore, set up for this
        forward. Returns logits [B, N, V] ([B, 1, V] with last_only)."""
        if self.fused is not None:
            return self.fused.forward(cache, ids, positions, attention_mask, last_only)
        extra = {"logits_to_keep": 1} if last_only and self.takes_logits_to_keep else {}
        result = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=attention_mask,
            use_cache=True,
            **{self.cache_kwarg: cache},
            **extra,
        )
        return result.logits
