"""The target model: loading a local checkpoint and running forwards over token trees on top of a KV cache.

Tree attention uses transformers' custom-4D-mask path: a mask of shape [B, 1, q_len, kv_len] is passed to the
attention kernel as-is (both 5.17 and 5.24 skip their own mask construction for it). It must be additive, in the
model's dtype (0 = attend, dtype min = masked): the eager kernel adds the mask to the scores, so a boolean mask would
be silently wrong there, while sdpa takes either. position_ids are always explicit: a node's position is the
cache length plus its depth, which the default (cache length + index) would get wrong.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cast_core.identity import vocab_hash
from cast_core.tree import TokenTree
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
    n = len(tree)
    mask = torch.zeros(n, prefix_length + n, dtype=dtype, device=device)  # the prefix part stays 0: visible
    hidden = torch.from_numpy(~tree.ancestor_mask()).to(device)  # [N, N], only this crosses to the device
    mask[:, prefix_length:].masked_fill_(hidden, torch.finfo(dtype).min)
    return mask[None, None]


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

    @staticmethod
    def load(
        model_dir: str | Path,
        dtype: str = "auto",
        device: str = "auto",
        attn_implementation: str = "sdpa",
        max_context: int | None = None,
        model_name: str = "",
    ) -> TargetModel:
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
        )

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @torch.no_grad()  # not inference_mode: its tensors refuse the in-place KV compaction
    def prefill(self, kv: SequenceKV, token_ids: Sequence[int]) -> None:
        """Append the KV entries of token_ids (a causal chain at positions kv.length...) to kv."""
        if not token_ids:
            return
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)  # [1, T]
        positions = kv.length + torch.arange(ids.shape[1], device=self.device)[None]  # [1, T]
        # No mask: on a causal chain the model builds its own (and sdpa may use its causal kernels).
        # The logits are not needed; the cache is filled as a side effect.
        self._forward(kv, ids, positions, attention_mask=None, last_only=True)
        kv.appended(ids.shape[1])

    @torch.no_grad()  # not inference_mode: its tensors refuse the in-place KV compaction
    def tree_logits(self, kvs: Sequence[SequenceKV], trees: Sequence[TokenTree]) -> list[torch.Tensor]:
        """One forward per sequence over all nodes of its tree; returns logits [N_i, V] on the model's device.

        Appends N_i entries to each kv: the caller keeps the accepted ones (SequenceKV.keep). Batched interface,
        looped for now; one ragged batched forward is a later issue.
        """
        out = []
        for kv, tree in zip(kvs, trees, strict=True):
            ids = torch.from_numpy(tree.tokens).to(self.device)[None]  # [1, N]
            positions = (kv.length + torch.from_numpy(tree.depths)).to(self.device)[None]  # [1, N]
            mask = tree_attention_mask(kv.length, tree, self.dtype, self.device)  # [1, 1, N, P + N]
            logits = self._forward(kv, ids, positions, attention_mask=mask)  # [1, N, V]
            kv.appended(len(tree))
            out.append(logits[0])
        return out

    def _forward(self, kv: SequenceKV, ids, positions, attention_mask, last_only: bool = False) -> torch.Tensor:
        extra = {"logits_to_keep": 1} if last_only and self.takes_logits_to_keep else {}
        result = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=attention_mask,
            use_cache=True,
            **{self.cache_kwarg: kv.cache},
            **extra,
        )
        return result.logits
