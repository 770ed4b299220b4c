"""The target model: loading a local checkpoint and running forwards over token trees on top of a KV cache.

Tree attention uses transformers' custom-4D-mask path: a mask of shape [B, 1, q_len, kv_len] is passed to the
attention kernel as-is (both 5.17 and 5.24 skip their own mask construction for it). It must be additive, in the
model's dtype (0 = attend, dtype min = masked): the eager kernel adds the mask to the scores, so a boolean mask would
be silently wrong there, while sdpa takes either. position_ids are always explicit: a node's position is the
cache length plus its depth, which the default (cache length + index) would get wrong.

Batching: a Verify (or Prefill) is one forward over all its sequences, whatever their context lengths P_b and tree
sizes N_b. Rows are padded to N_max nodes (padding nodes: token 0 at position P_b, seeing only themselves); every
row's new entries go to the same cache columns W0 = max P_b onwards, and the columns between P_b and W0 are masked
(kv_cache.py: the slotted store, and why a batch of all live sequences needs no gather).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cast_core.tree import TokenTree
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


def tree_attention_mask(prefix_length: int, tree: TokenTree, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 1, N, prefix_length + N] additive mask: every node sees the whole prefix, its ancestors and itself."""
    return batch_attention_mask(np.array([prefix_length]), prefix_length, tree.ancestor_mask()[None], dtype, device)


def batch_attention_mask(prefix_lengths: np.ndarray, write_at: int, visible: np.ndarray, dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    """[B, 1, N, write_at + N] additive mask for a batch laid out as kv_cache.py describes.

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
    # cost ~45 ms more than the next (8B shape, H100: prefill of 100-131 tokens 64-108 ms new, 30 ms seen): with
    # every prompt length distinct, first requests paid it. Padded, a few dozen shapes cover every prompt.
    prefill_align: int = 1

    @staticmethod
    def load(
        model_dir: str | Path,
        dtype: str = "auto",
        device: str = "auto",
        attn_implementation: str = "sdpa",
        max_context: int | None = None,
        model_name: str = "",
        forward: str = "auto",
    ) -> TargetModel:
        """forward: which forward runs (fused_llama.FORWARDS): auto is our fused Llama forward where it applies
        (its elementwise kernels compiled on CUDA), else transformers' own."""
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
            fused=build_fused(model, forward, torch_device),
            prefill_align=PREFILL_ALIGN if torch_device.type == "cuda" else 1,
        )

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @torch.no_grad()
    def prefill(self, kvs: Sequence[SequenceKV], token_ids: Sequence[Sequence[int]]) -> None:
        """Append the KV entries of token_ids[b] (a causal chain at positions kvs[b].length...) to kvs[b]: one
        padded forward for the whole batch. The logits are not needed; the cache is filled as a side effect."""
        rows = [(kv, np.asarray(ids, dtype=np.int64)) for kv, ids in zip(kvs, token_ids, strict=True) if len(ids)]
        if not rows:
            return
        chains = [np.tril(np.ones((len(ids), len(ids)), dtype=bool)) for _, ids in rows]  # a chain's ancestors
        depths = [np.arange(len(ids)) for _, ids in rows]
        store = rows[0][0].store
        width = -(-max(len(ids) for _, ids in rows) // self.prefill_align) * self.prefill_align
        if store.fixed:  # the padding's scratch entries must fit the static buffers too
            width = min(width, store.context_capacity - max(kv.length for kv, _ in rows))
        self._batched_forward([kv for kv, _ in rows], [ids for _, ids in rows], depths, chains, last_only=True,
                              width=width)
        rows[0][0].store.keep([kv for kv, _ in rows], [range(len(ids)) for _, ids in rows])

    @torch.no_grad()
    def tree_logits(self, kvs: Sequence[SequenceKV], trees: Sequence[TokenTree]) -> list[torch.Tensor]:
        """One forward over all nodes of all trees, tree b on top of kvs[b]; returns logits [N_b, V] per tree, on
        the model's device. The new entries wait past every sequence's length: the caller keeps the accepted ones
        (KVStore.keep); lengths do not change here."""
        logits = self._batched_forward(
            kvs, [t.tokens for t in trees], [t.depths for t in trees], [t.ancestor_mask() for t in trees]
        )  # [B, N_max, V]
        return [logits[b, : len(t)] for b, t in enumerate(trees)]

    def _batched_forward(self, kvs: Sequence[SequenceKV], tokens: Sequence[np.ndarray], depths: Sequence[np.ndarray],
                         ancestors: Sequence[np.ndarray], last_only: bool = False, width: int = 0) -> torch.Tensor:
        """Row b: tokens[b] at positions length_b + depths[b], node i seeing the prefix of kvs[b] and the nodes j
        with ancestors[b][i, j]; rows padded to at least `width` nodes. Returns logits [B, N, V] in the order of kvs
        ([B, 1, V] if last_only)."""
        store = kvs[0].store
        # Rows in slot order: a batch of consecutive slots (every live sequence, usually) attends to buffer views.
        order = sorted(range(len(kvs)), key=lambda b: kvs[b].slot)
        kvs = [kvs[b] for b in order]
        lengths = np.array([kv.length for kv in kvs], dtype=np.int64)  # [B]
        ids = pad_rows([tokens[b] for b in order], fill=0, width=width)  # [B, N]; padding nodes carry token 0...
        positions = lengths[:, None] + pad_rows([depths[b] for b in order], fill=0, width=width)  # ...at P_b
        store.begin_forward(kvs, ids.shape[1])
        try:
            visible = padded_visibility([ancestors[b] for b in order], width=ids.shape[1])
            mask = batch_attention_mask(lengths, store.write_at, visible, self.dtype, self.device)  # [B, 1, N, W0 + N]
            logits = self._forward(store, torch.from_numpy(ids).to(self.device),
                                   torch.from_numpy(positions).to(self.device), mask, last_only)
        finally:
            store.end_forward()
        if order != sorted(order):
            logits = logits[torch.from_numpy(np.argsort(order)).to(logits.device)]  # back to the caller's order
        return logits

    def _forward(self, cache, ids, positions, attention_mask, last_only: bool = False) -> torch.Tensor:
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
