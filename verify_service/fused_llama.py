"""A Llama-family forward over the model's own weights, in fewer and larger kernels.

transformers' Llama forward launches ~35 kernels a layer: 7 projections, RMSNorm as 7 elementwise kernels, RoPE
through slices, negation and concatenation, the SiLU and the product apart, K and V repeated for grouped-query
attention. On a GPU each launch costs time even inside a CUDA graph (reports/verifier-step/ measures how much).
This forward computes the same function with:

- one GEMM for Q, K and V and one for gate and up: the weights are concatenated once at load and the transformers
  modules' parameters become views of them, so nothing is stored twice and the transformers forward still works;
- grouped-query attention without repeating K and V: a KV head's G query heads are stacked along the query rows
  ([B, H_kv, G * N, D]), and the tree mask is stacked likewise once a forward;
- the elementwise work in three functions (residual add + RMSNorm, RoPE + head layout, SiLU * up), which
  torch.compile fuses into one kernel each where it can (CUDA with Triton): about 12 kernels a layer.

The arithmetic follows transformers' order and dtypes (RMSNorm statistics in float32, RoPE in the model's dtype),
so in float32 the logits agree with the transformers forward to rounding (tests/verify_service/test_fused_llama.py).
Compiled kernels keep intermediates in registers and may round differently in bfloat16, as any other kernel choice.
The KV cache is the KVStore (kv_cache.py), whose update() is called per layer as transformers' layers call it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("verify_service")

MASK_ALIGN = 16  # elements: sdpa's memory-efficient kernel pads (copies) a mask whose row stride is not aligned


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why this model cannot take the fused forward, or None if it can."""
    config = model.config.get_text_config()
    if config.model_type != "llama":
        return f"model_type {config.model_type!r} is not llama"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "the model has attention or MLP biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    return None


# --- the elementwise parts (compiled on CUDA) -----------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: statistics and scaling in float32, rounded to x's dtype, times the weight."""
    x32 = x.float()
    scaled = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * scaled.to(x.dtype)


def add_rms_norm(residual: torch.Tensor, update: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + update, its RMSNorm): the residual add of one block and the next block's norm in one kernel."""
    total = residual + update
    return total, rms_norm(total, weight, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_and_layout(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                    head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv: [B, N, (H + 2 H_kv) * D] from the fused projection; cos, sin: [B, N, D].
    Returns q [B, H_kv, G * N, D] (a KV head's G query heads stacked along the rows, rotated),
    k [B, H_kv, N, D] (rotated) and v [B, H_kv, N, D]."""
    b, n, _ = qkv.shape
    groups = heads // kv_heads
    q, k, v = qkv.view(b, n, heads + 2 * kv_heads, head_dim).split((heads, kv_heads, kv_heads), dim=2)
    cos, sin = cos[:, :, None], sin[:, :, None]  # [B, N, 1, D]
    q = q * cos + rotate_half(q) * sin  # [B, N, H, D]; query head h belongs to KV head h // G, as in repeat_kv
    k = k * cos + rotate_half(k) * sin  # [B, N, H_kv, D]
    q = q.view(b, n, kv_heads, groups, head_dim).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, groups * n, head_dim)
    return q, k.transpose(1, 2), v.transpose(1, 2)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [..., 2 I] from the fused projection -> SiLU(gate) * up: [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class Kernels:
    add_rms_norm: Callable
    rope_and_layout: Callable
    silu_mul: Callable


EAGER = Kernels(add_rms_norm, rope_and_layout, silu_mul)


def compiled_kernels() -> Kernels:
    """The same functions through torch.compile. Shapes: automatic dynamic (dynamic=None), so only the dimensions
    seen to change (batch, tokens) become symbolic after the probe and the feature sizes stay constants
    (dynamic=True made every size symbolic, and the gate/up split's index arithmetic ran on run-time sizes: many
    times slower)."""
    # Not fullgraph: past the recompile limit a fullgraph function raises, where this one runs eagerly (slower,
    # still right). The probe compiles what serving needs; the limit only guards against the unforeseen.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)

    def fuse(fn: Callable) -> Callable:
        return torch.compile(fn, dynamic=None)

    return Kernels(fuse(add_rms_norm), fuse(rope_and_layout), fuse(silu_mul))


def stacked_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, 1, N, W] additive mask -> [B, 1, G * N, W] for the stacked query rows (row g * N + i is node i), rows
    aligned to MASK_ALIGN elements in memory (a view of a padded buffer)."""
    b, _, n, width = mask.shape
    padded = -(-width // MASK_ALIGN) * MASK_ALIGN
    out = mask.new_empty(b, 1, groups, n, padded)
    out[..., :width] = mask[:, :, None]
    return out.view(b, 1, groups * n, padded)[..., :width]


# --- the model ------------------------------------------------------------------------------------------------


@dataclass
class FusedLayer:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(H + 2 H_kv) * D, hidden]
    o: torch.Tensor  # [hidden, H * D]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 I, hidden]
    down: torch.Tensor  # [hidden, I]


def fuse_rows(*linears: torch.nn.Linear) -> torch.Tensor:
    """One weight with the linears' rows stacked; each linear's weight becomes a view of it (no second copy)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = torch.nn.Parameter(weight[start : start + rows], requires_grad=False)
        start += rows
    return weight


class FusedLlama:
    """The forward of a LlamaForCausalLM with fused projections and elementwise kernels; same inputs and outputs
    as TargetModel.forward."""

    def __init__(self, model: torch.nn.Module, kernels: Kernels = EAGER) -> None:
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"the fused forward does not apply: {reason}")
        config = model.config.get_text_config()
        self.model = model
        self.kernels = kernels
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.scaling = self.head_dim**-0.5
        self.layers = []
        with torch.no_grad():
            for layer in model.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                self.layers.append(FusedLayer(
                    input_norm=layer.input_layernorm.weight,
                    qkv=fuse_rows(attn.q_proj, attn.k_proj, attn.v_proj),
                    o=attn.o_proj.weight,
                    post_norm=layer.post_attention_layernorm.weight,
                    gate_up=fuse_rows(mlp.gate_proj, mlp.up_proj),
                    down=mlp.down_proj.weight,
                ))

    @torch.no_grad()
    def forward(self, cache, ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor,
                last_only: bool = False) -> torch.Tensor:
        """ids, positions: [B, N]; attention_mask: [B, 1, N, W + N] additive, in the model's dtype; cache: the
        KVStore (update() per layer returns the [B, H_kv, W + N, D] keys and values to attend to).
        Returns logits [B, N, V] ([B, 1, V] with last_only)."""
        k = self.kernels
        b, n = ids.shape
        groups = self.heads // self.kv_heads
        body = self.model.model
        x = body.embed_tokens(ids)  # [B, N, hidden]
        cos, sin = body.rotary_emb(x, positions)  # [B, N, D] each, in the model's dtype
        mask = stacked_mask(attention_mask, groups)  # [B, 1, G * N, W + N]
        update = torch.zeros_like(x)  # the first layer's "previous block output": the add leaves x as it is
        for i, layer in enumerate(self.layers):
            x, h = k.add_rms_norm(x, update, layer.input_norm, self.eps)
            q, key, value = k.rope_and_layout(h @ layer.qkv.T, cos, sin, self.heads, self.kv_heads, self.head_dim)
            keys, values = cache.update(key, value, i)  # [B, H_kv, W + N, D]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
            attn = attn.view(b, self.kv_heads, groups, n, self.head_dim).permute(0, 3, 1, 2, 4).reshape(b, n, -1)
            x, h = k.add_rms_norm(x, attn @ layer.o.T, layer.post_norm, self.eps)
            update = k.silu_mul(h @ layer.gate_up.T) @ layer.down.T
        _, h = k.add_rms_norm(x, update, body.norm.weight, self.eps)  # all positions: one compiled shape fewer
        return self.model.lm_head(h[:, -1:] if last_only else h)  # [B, N, V] or [B, 1, V]


def build_fused(model: torch.nn.Module, device: torch.device) -> FusedLlama | None:
    """The forward a TargetModel runs: ours for a model it covers, its elementwise kernels compiled on CUDA and
    eager on the CPU; None (transformers' own) for any other model. Where compiling fails on a small probe, the
    kernels run eagerly, with a warning."""
    reason = unsupported_reason(model)
    if reason:
        log.info("transformers' forward: %s", reason)
        return None
    kernels = EAGER
    if device.type == "cuda":
        try:
            kernels = compiled_kernels()
            probe_kernels(kernels, model, device)
        except Exception as e:  # no Triton, no compiler: the fused forward still saves the launches of the GEMMs
            log.warning("torch.compile of the fused kernels failed (%s: %s); running them eagerly",
                        type(e).__name__, e)
            kernels = EAGER
    return FusedLlama(model, kernels)


@torch.no_grad()  # as in serving: grad mode is part of what a compiled function is specialised on
def probe_kernels(kernels: Kernels, model: torch.nn.Module, device: torch.device) -> None:
    """Run each kernel on small inputs of the model's dtype (raises if compiling fails). Two batch and token sizes
    make those dimensions dynamic; sizes of 1 are always compiled apart (torch.compile specialises them), so
    those come now too, rather than in the middle of serving."""
    config = model.config.get_text_config()
    dtype = model.dtype
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)

    def rand(*shape: int) -> torch.Tensor:  # a fresh tensor per argument: aliased arguments compile apart too
        return torch.randn(*shape, dtype=dtype, device=device)

    for b, n in ((2, 3), (3, 5), (1, 5), (3, 1), (1, 1)):
        # The norm weight and epsilon as in serving: a Parameter (a plain tensor would compile apart) and the
        # model's own epsilon (a float argument is a constant of the compiled code: another value recompiles).
        kernels.add_rms_norm(rand(b, n, config.hidden_size), rand(b, n, config.hidden_size), model.model.norm.weight,
                             float(config.rms_norm_eps))
        kernels.rope_and_layout(rand(b, n, (heads + 2 * kv_heads) * head_dim), rand(b, n, head_dim),
                                rand(b, n, head_dim), heads, kv_heads, head_dim)
        kernels.silu_mul(rand(b, n, 2 * int(config.intermediate_size)))
