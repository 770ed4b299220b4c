"""The token the target chooses at each tree node: its argmax (greedy), or a draw from its sampling distribution.

Processing follows transformers' generate(): temperature, then top-k, then top-p, applied to each node's logits;
the result is the distribution p(. | path) that the target alone would sample the node's next token from.

The draw is Gumbel-max, t = argmax(scores + g), with g a standard Gumbel noise vector that depends only on
(seed, absolute position of the token being sampled): a counter-based stream. All nodes at one depth share one
noise vector, and at most one of them is on the committed path. So the token committed at a position is exactly
the one the target's own autoregressive sampling with this stream draws there, whatever the tree: a seeded
request gives the same output under every policy and every CAST tree shape (which change with timing), and after
a failover replay (positions are absolute). Each position has its own independent noise, and a step's outcome
depends only on the noise of the positions it commits (a stopping time), so every committed token is an exact
sample of p(. | committed prefix): lossless.

Positions: the root (the last committed token) sits at index P = the cached length; a node at depth d predicts
the token at index P + d + 1, counted from the first prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (top-k and top-p cannot change an argmax)
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    seed: int | None = None  # None: the verifier draws one per call (exact, not reproducible)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


def process_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """[N, V] logits -> [N, V] scores, -inf where top-k / top-p remove a token. Same ops, same order as HF's
    TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper (min_tokens_to_keep = 1)."""
    scores = logits / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]  # [N, 1]
        scores = scores.masked_fill(scores < kth, -torch.inf)
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)  # [N, V]
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # the most likely token always stays
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, -torch.inf)
    return scores


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, position: int) -> int:
    """The generator seed for one (request seed, position) pair: a 63-bit hash, so nearby pairs get unrelated streams."""
    return splitmix64(splitmix64(seed & MASK64) ^ position) >> 1


def gumbel_noise(seed: int, positions: range, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(positions), V] float64 standard Gumbel noise; row j depends only on (seed, positions[j]) and the device."""
    generator = torch.Generator(device=device)
    rows = []
    for position in positions:
        generator.manual_seed(stream_seed(seed, position))
        rows.append(torch.rand(vocab_size, generator=generator, device=device, dtype=torch.float64))
    uniform = torch.stack(rows).clamp_(min=torch.finfo(torch.float64).tiny)  # rand may return 0
    return -torch.log(-torch.log(uniform))


def target_tokens(logits: torch.Tensor, depths: np.ndarray, first_position: int, params: SamplingParams, seed: int = 0) -> np.ndarray:
    """logits: [N, V] a tree's target logits on the device; depths: [N]; first_position: the index of the token a
    depth-0 node predicts. Returns [N] on the host: the target's token at each node (only N integers cross)."""
    if params.greedy:
        return logits.argmax(dim=-1).cpu().numpy()
    # float32 at least: bf16 scores would coarsen top-p's cumulative sums and the Gumbel comparison.
    scores = process_logits(logits.to(torch.promote_types(logits.dtype, torch.float32)), params.temperature,
                            params.top_k, params.top_p)  # [N, V]
    max_depth = int(depths.max())
    noise = gumbel_noise(seed, range(first_position, first_position + max_depth + 1), scores.shape[-1], scores.device)
    noise = noise.to(scores.dtype)[torch.from_numpy(depths).to(scores.device)]  # [D + 1, V] -> [N, V], one row per depth
    # argmax(log softmax(scores) + g) = argmax(scores + g): the normaliser is one constant per row.
    return (scores + noise).argmax(dim=-1).cpu().numpy()
