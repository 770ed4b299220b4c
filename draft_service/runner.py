"""One ONNX Runtime session over an exported draft graph (see export.py for its inputs and outputs).

numpy in, numpy out. On a GPU the KV cache should stay on the device with I/O binding; that is a later change
confined to this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from draft_service.export import ExportMeta, io_names

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def choose_provider(provider: str = "auto") -> str:
    """auto: CUDA when this onnxruntime build has it, else CPU; cpu / cuda: that one or an error."""
    available = ort.get_available_providers()
    if provider == "auto":
        return PROVIDERS["cuda"] if PROVIDERS["cuda"] in available else PROVIDERS["cpu"]
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be auto, cpu or cuda, got {provider!r}")
    if PROVIDERS[provider] not in available:
        raise ValueError(f"{PROVIDERS[provider]} is not in this onnxruntime build (available: {available})")
    return PROVIDERS[provider]


@dataclass
class StepOutput:
    probs: np.ndarray          # [B, T, K] float32, descending
    ids: np.ndarray            # [B, T, K] int64
    keys: list[np.ndarray]     # per layer [B, Hkv, P+T, D]
    values: list[np.ndarray]   # per layer [B, Hkv, P+T, D]


class DraftRunner:
    """The draft model as a function: (tokens, positions, mask, past KV) -> (top-K, present KV)."""

    def __init__(self, onnx_path: str | Path, meta: ExportMeta, provider: str = "auto", threads: int = 0) -> None:
        self.meta = meta
        self.provider = choose_provider(provider)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=[self.provider])
        self.input_names, self.output_names = io_names(meta.num_layers)
        self.dtype = np.dtype(meta.dtype)
        # The additive mask's "hidden" value: finite, so a row is never all -inf (softmax of that is NaN).
        self.mask_min = float(np.finfo(self.dtype).min)

    @property
    def backend(self) -> str:
        return f"onnxruntime:{self.provider}"

    def empty_kv(self, length: int = 0) -> np.ndarray:
        return np.zeros((self.meta.num_kv_heads, length, self.meta.head_dim), dtype=self.dtype)  # [Hkv, P, D]

    def run(
        self,
        input_ids: np.ndarray,        # [B, T] int64
        position_ids: np.ndarray,     # [B, T] int64
        attention_mask: np.ndarray,   # [B, 1, T, P+T] additive, model dtype
        past_keys: list[np.ndarray],  # per layer [B, Hkv, P, D]
        past_values: list[np.ndarray],
    ) -> StepOutput:
        feeds = {
            "input_ids": input_ids.astype(np.int64, copy=False),
            "position_ids": position_ids.astype(np.int64, copy=False),
            "attention_mask": attention_mask.astype(self.dtype, copy=False),
        }
        for l in range(self.meta.num_layers):
            feeds[f"past.{l}.key"] = past_keys[l]
            feeds[f"past.{l}.value"] = past_values[l]
        out = self.session.run(self.output_names, feeds)
        return StepOutput(probs=out[0], ids=out[1], keys=out[2::2], values=out[3::2])
