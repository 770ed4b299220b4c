"""The verifier's KV cache of one sequence: the keys and values of every committed token but the last.

It wraps a transformers DynamicCache (one growing tensor pair per layer) and adds the one operation speculative
decoding needs: after a tree forward appended N entries, keep only those of the accepted path, in order.
Static fixed-size buffers for CUDA graphs (a later issue) would replace the DynamicCache behind the same methods.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache


class SequenceKV:
    def __init__(self) -> None:
        # No config: every layer is a plain full-attention DynamicLayer. Layers appear on the first forward.
        self.cache = DynamicCache()
        # Tracked here, not read from the cache: an empty DynamicCache has no layers to ask.
        self.length = 0

    def appended(self, n: int) -> None:
        """Record that a forward appended n entries to every layer."""
        self.length += n

    def keep(self, prefix_length: int, kept: Sequence[int]) -> None:
        """Keep the first prefix_length entries, then entries prefix_length + kept[j] for each j; drop the rest.

        kept is increasing (tree indices of the root and the accepted path), so entry j moves down or stays.
        """
        total = prefix_length + len(kept)
        for layer in self.cache.layers:
            if layer.keys is None or layer.keys.numel() == 0:
                continue
            device = layer.keys.device
            src = torch.as_tensor(kept, dtype=torch.long, device=device) + prefix_length  # [K]
            # keys, values: [B=1, H_kv, length, D]; the fancy index copies, so source and target may overlap.
            layer.keys[:, :, prefix_length:total] = layer.keys[:, :, src]
            layer.values[:, :, prefix_length:total] = layer.values[:, :, src]
            layer.keys = layer.keys[:, :, :total]
            layer.values = layer.values[:, :, :total]
        self.length = total

    def truncate(self, length: int) -> None:
        """Forget everything past `length` entries (rolls back a forward that failed half way)."""
        self.keep(length, [])
