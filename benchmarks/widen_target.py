"""Widen the small reference target into an 8B- or 1B-shaped Llama with the same logits (issue 7's target).

The small target (hidden 512, 6 layers, 4 query heads x 128, 1 KV head) is cheap, so every verifier forward costs
the same few ms and CAST has no cost curve to trade on. The widened model has Llama-3.1-8B's (or Llama-3.2-1B's)
shapes, so each forward reads the same bytes and does the same FLOPs as the real model, yet it computes exactly the
small target's function: the acceptance behaviour measured with the reference draft carries over unchanged.

How (small dims h, n layers; wide dims H, L):
- Residual stream: the small residual x sits in channels [0, h). It is written `m` times, into [0, h), [h, 2h), ...
  (the embedding, o_proj and down_proj rows are repeated), the rest of the stream stays exactly 0. RMSNorm then sees
  mean(x_wide^2) = (m h / H) mean(x^2), so it matches with weights w * sqrt(m h / H) on [0, h) (0 elsewhere) and
  eps * m h / H. `m` is chosen so that H / (m h) is a power of 4: the norm scale is then a power of two (1/2 for
  both 8b and 1b), exact in every dtype, so the saved bf16 norms are the small model's bf16 norms, halved.
- Norm weights are 0 outside [0, h): every matrix that reads the stream (q, k, v, gate, up, lm_head) sees zeros
  there, so its other columns may hold anything.
- Attention: the small query heads are wide heads 0..nq-1; each wide KV head that serves them is a copy of the small
  KV head they use (8b: group 4, so KV head 0 serves heads 0..3; a group of 2 duplicates the KV head). Other KV
  heads have v = 0, so the heads they serve output exactly 0 and their o_proj columns may hold anything.
- MLP: the small units are the first ones; the others have up = 0, so act(gate) * 0 = 0 and their gate rows and
  down columns may hold anything.
- Layers: the n real layers are spread over the L (layer i at i * L // n); the extra ones have v = 0 and up = 0, so
  attention and MLP add exactly 0 to the residual.
- Everything marked "may hold anything" is filled with N(0, 0.02) noise by default (`fill="random"`), zeros with
  `fill="zeros"`. Noise only ever meets exact zeros, so the function is unchanged; it keeps the weights from being
  ~99% zeros, since GPUs run matmuls on zeros measurably faster (lower switching power, higher clocks: ~15% on an
  A100, https://www.thonking.ai/p/strangely-matrix-multiplications), which would flatter the cost curve. About 29%
  of the 8b's weights stay zero (v and up of dead units, writers into unused channels), not 99.6%. The activations
  entering the matmuls are still exact zeros outside the small model's channels and units.

Shapes: `8b` is Llama-3.1-8B's (untied embeddings, as in the 8B: the LM head costs 4096 x 8192). `1b` is
Llama-3.2-1B's byte for byte per layer, with 16 heads x 128 and 4 KV heads x 128 instead of 32 x 64 and 8 x 64 (the
small model's 128-wide heads cannot be split): q/k/v/o sizes, KV-cache bytes per token and attention matmul FLOPs
are the 1B's (the softmax has half as many score rows); tied embeddings as in the 1B. The vocabulary stays the small
model's 8192.

    python -m benchmarks.widen_target --source models/reference/target --shape 8b --out /tmp/target-8b --report r.json

builds the model in float32 on the GPU (~28 GB), compares its logits with the small target's on HumanEval prompts
(float32, then both in the saved dtype, with the small model's own float32-vs-bf16 rounding as the floor), casts
to bf16 in place, saves (14.1 GB in 4 GB shards), reloads the saved dir and checks it computes the same.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

SHAPES: dict[str, dict] = {
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=14336, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
               intermediate_size=8192, tie_word_embeddings=True),
}
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "tie_word_embeddings")
NOISE_STD = 0.02
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja")
# Used when HumanEval is not available (CPU tests, machines without the data file).
BUILTIN_PROMPTS = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\nimport sys\n\n\ndef main(argv):\n    for name in os.listdir(argv[1]):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n",
)


def resolve_shape(shape: str | dict) -> dict:
    """A shape name from SHAPES, a JSON object string, or a dict of LlamaConfig fields (SHAPE_KEYS)."""
    if isinstance(shape, str):
        shape = SHAPES[shape] if shape in SHAPES else json.loads(shape)
    unknown = set(shape) - set(SHAPE_KEYS)
    if unknown:
        raise ValueError(f"unknown shape fields {sorted(unknown)}; allowed: {SHAPE_KEYS}")
    return dict(shape)


def residual_copies(small_hidden: int, wide_hidden: int) -> int:
    """How many times the small residual is written into the wide one: the fewest copies m for which
    wide / (m * small) is a power of 4, so the RMSNorm scale sqrt(m * small / wide) is a power of two; 1 if none."""
    for m in range(1, wide_hidden // small_hidden + 1):
        ratio, rest = divmod(wide_hidden, m * small_hidden)
        if rest == 0 and ratio & (ratio - 1) == 0 and (ratio.bit_length() - 1) % 2 == 0:
            return m
    return 1


def layer_positions(small_layers: int, wide_layers: int) -> list[int]:
    """Where the small model's layers go among the wide model's: spread evenly (why: a self-speculative draft that
    runs the target's first layers would otherwise find all the real work there)."""
    return [i * wide_layers // small_layers for i in range(small_layers)]


def wide_config(small_config, shape: str | dict):
    """The wide LlamaConfig: the small one with the shape's fields and the RMSNorm eps rescaled."""
    sc = small_config
    fields = {k: getattr(sc, k) for k in SHAPE_KEYS}
    fields["head_dim"] = getattr(sc, "head_dim", None) or sc.hidden_size // sc.num_attention_heads
    fields.update(resolve_shape(shape))
    check_widenable(small_config, fields)
    h, H = small_config.hidden_size, fields["hidden_size"]
    m = residual_copies(h, H)
    data = small_config.to_dict()
    data.update(fields)
    data["rms_norm_eps"] = small_config.rms_norm_eps * m * h / H
    return type(small_config).from_dict(data)


def check_widenable(small_config, fields: dict) -> None:
    """Raise ValueError unless the small model embeds exactly into the wide shape."""
    sc = small_config
    head_dim = getattr(sc, "head_dim", None) or sc.hidden_size // sc.num_attention_heads
    problems = []
    if getattr(sc, "attention_bias", False) or getattr(sc, "mlp_bias", False):
        problems.append("biases are not supported")
    if fields["head_dim"] != head_dim:
        problems.append(f"head_dim must stay {head_dim} (heads cannot be split or merged)")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if fields[key] < getattr(sc, key):
            problems.append(f"{key} {fields[key]} < the small model's {getattr(sc, key)}")
    if fields["num_attention_heads"] % fields["num_key_value_heads"]:
        problems.append("num_attention_heads must be a multiple of num_key_value_heads")
    else:
        group = fields["num_attention_heads"] // fields["num_key_value_heads"]
        small_group = sc.num_attention_heads // sc.num_key_value_heads
        # Each wide KV head serves `group` consecutive query heads: they must all use one small KV head.
        if small_group % group:
            problems.append(f"wide GQA group {group} must divide the small group {small_group}")
    if fields["tie_word_embeddings"] and not sc.tie_word_embeddings:
        problems.append("a model with an untied LM head cannot be tied")
    if problems:
        raise ValueError("cannot widen: " + "; ".join(problems))


def no_init():
    """Skip transformers' random init (every weight is written afterwards); a no-op where the helper is missing."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        with contextlib.suppress(ImportError, AttributeError):
            module = __import__(where, fromlist=["no_init_weights"])
            return module.no_init_weights()
    return contextlib.nullcontext()


def fill_free(t: torch.Tensor, fill: str, gen: torch.Generator | None) -> None:
    """Fill weights that only ever meet exact zeros: noise, or zeros."""
    if fill == "random":
        t.normal_(0.0, NOISE_STD, generator=gen)
    elif fill == "zeros":
        t.zero_()
    else:
        raise ValueError(f"fill must be 'random' or 'zeros', not {fill!r}")


def widen(small, shape: str | dict, fill: str = "random", seed: int = 0, dtype: torch.dtype | None = None,
          device: str | torch.device | None = None):
    """A wide LlamaForCausalLM, built on `device` in `dtype` (default: the small model's), whose logits equal the
    small model's up to rounding. `shape` is a SHAPES name, a JSON string or a dict of SHAPE_KEYS fields."""
    from transformers import AutoModelForCausalLM

    sc = small.config
    cfg = wide_config(sc, shape)
    device = torch.device(device) if device is not None else small.device
    dtype = dtype or small.dtype
    with torch.device(device), no_init():
        wide = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if cfg.tie_word_embeddings:
        wide.tie_weights()  # no_init skips the tying that init would do
        if wide.lm_head.weight is not wide.model.embed_tokens.weight:
            wide.lm_head.weight = wide.model.embed_tokens.weight
    wide.eval()
    gen = torch.Generator(device=device).manual_seed(seed) if fill == "random" else None
    with torch.no_grad():
        copy_into(small, wide, fill, gen)
    wide.generation_config = type(small.generation_config).from_dict(small.generation_config.to_dict())
    return wide


def copy_into(small, wide, fill: str, gen: torch.Generator | None) -> None:
    """Write every weight of `wide` (the module docstring says which are the small model's, which must be 0 and
    which are free)."""
    sc, wc = small.config, wide.config
    h, H = sc.hidden_size, wc.hidden_size
    m = residual_copies(h, H)
    scale = math.sqrt(m * h / H)
    d = wc.head_dim
    nq, nkv = sc.num_attention_heads, sc.num_key_value_heads
    group, small_group = wc.num_attention_heads // wc.num_key_value_heads, nq // nkv
    real_kv = -(-nq // group)  # wide KV heads that serve a real query head
    inter = sc.intermediate_size
    copies = [slice(c * h, (c + 1) * h) for c in range(m)]

    def write_rows(dst: torch.Tensor, src: torch.Tensor, cols: slice = slice(None)) -> None:
        """Rows that write the residual: the small rows into every copy, exact zeros into the rest of the stream."""
        dst[:, cols] = 0
        for rows in copies:
            dst[rows, cols] = src.to(dst)

    def set_norm(dst: torch.Tensor, src: torch.Tensor | None) -> None:
        dst.zero_()
        dst[:h] = (src.to(dst) if src is not None else 1.0) * scale

    # Embedding: (vocab, H), a writer of the residual.
    emb = wide.model.embed_tokens.weight
    write_rows(emb.T, small.model.embed_tokens.weight.T)
    if not wc.tie_word_embeddings:
        head = wide.lm_head.weight
        fill_free(head, fill, gen)
        head[:, :h] = small.lm_head.weight.to(head)
    set_norm(wide.model.norm.weight, small.model.norm.weight)

    real_at = {p: i for i, p in enumerate(layer_positions(sc.num_hidden_layers, wc.num_hidden_layers))}
    for p, layer in enumerate(wide.model.layers):
        att, mlp = layer.self_attn, layer.mlp
        for lin in (att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            fill_free(lin.weight, fill, gen)
        # Dead KV heads and dead MLP units must output exact zeros: their v rows and up rows are 0.
        att.v_proj.weight[real_kv * d :] = 0
        mlp.up_proj.weight[inter:] = 0
        if p not in real_at:
            att.v_proj.weight.zero_()
            mlp.up_proj.weight.zero_()
            set_norm(layer.input_layernorm.weight, None)
            set_norm(layer.post_attention_layernorm.weight, None)
            continue
        src = small.model.layers[real_at[p]]
        sa, sm = src.self_attn, src.mlp
        set_norm(layer.input_layernorm.weight, src.input_layernorm.weight)
        set_norm(layer.post_attention_layernorm.weight, src.post_attention_layernorm.weight)
        att.q_proj.weight[: nq * d, :h] = sa.q_proj.weight.to(att.q_proj.weight)
        for j in range(real_kv):
            s = (j * group) // small_group  # the small KV head used by the query heads wide KV head j serves
            att.k_proj.weight[j * d : (j + 1) * d, :h] = sa.k_proj.weight[s * d : (s + 1) * d].to(att.k_proj.weight)
            att.v_proj.weight[j * d : (j + 1) * d, :h] = sa.v_proj.weight[s * d : (s + 1) * d].to(att.v_proj.weight)
        # o_proj: real heads' columns write the residual; dead heads served by a real KV head output real values,
        # so their columns must be 0 too; dead heads on dead KV heads output 0 and keep their fill.
        write_rows(att.o_proj.weight, sa.o_proj.weight, slice(0, nq * d))
        att.o_proj.weight[:, nq * d : real_kv * group * d] = 0
        mlp.gate_proj.weight[:inter, :h] = sm.gate_proj.weight.to(mlp.gate_proj.weight)
        mlp.up_proj.weight[:inter, :h] = sm.up_proj.weight.to(mlp.up_proj.weight)
        write_rows(mlp.down_proj.weight, sm.down_proj.weight, slice(0, inter))

    # Same head_dim and rope parameters: copy the rotary buffers so both models use bit-identical frequencies.
    small_buffers = dict(small.model.rotary_emb.named_buffers())
    for name, buf in wide.model.rotary_emb.named_buffers():
        if name in small_buffers and small_buffers[name].shape == buf.shape:
            buf.copy_(small_buffers[name])


# ------------------------------------------------------------------------------------------------------ checking


def check_texts(n: int) -> tuple[list[str], str]:
    """Up to n HumanEval prompts (trailing newline stripped, as benchmarks/reference_report does) and where they came
    from; the built-in snippets when HumanEval is not available."""
    from cast_models.humaneval import load_prompts

    try:
        return [q.rstrip("\n") for q in load_prompts()[:n]], "humaneval"
    except (FileNotFoundError, OSError) as exc:
        print(f"HumanEval unavailable ({exc}); checking on {len(BUILTIN_PROMPTS)} built-in snippets", file=sys.stderr)
        return list(BUILTIN_PROMPTS[:n]), "builtin"


@torch.inference_mode()
def compare_logits(small, wide, token_lists: list[list[int]]) -> dict:
    """Full logits of both models at every position: max |diff|, and how often the greedy argmax agrees."""
    worst = max_logit = 0.0
    agree = positions = 0
    for ids in token_lists:
        x = torch.tensor([ids], device=small.device)
        a = small(input_ids=x).logits[0].float()
        b = wide(input_ids=x.to(wide.device)).logits[0].float().to(a.device)
        worst = max(worst, (a - b).abs().max().item())
        max_logit = max(max_logit, a.abs().max().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        positions += len(ids)
    return {
        "dtype": str(next(wide.parameters()).dtype).removeprefix("torch."),
        "prompts": len(token_lists),
        "positions": positions,
        "max_abs_diff": worst,
        "max_abs_logit": max_logit,
        "argmax_agreement": agree / max(positions, 1),
        "argmax_disagreements": positions - agree,
    }


def weight_stats(model) -> dict:
    params = list(model.parameters())  # shared (tied) parameters are listed once
    count = sum(p.numel() for p in params)
    zeros = sum((p == 0).sum().item() for p in params)
    return {"params": count, "bytes": sum(p.numel() * p.element_size() for p in params), "zero_fraction": zeros / count}


def save_widened(wide, source: str | Path, out: str | Path, max_shard_size: str = "4GB",
                 provenance: dict | None = None) -> Path:
    """A normal HF checkpoint dir: config, sharded safetensors, generation config, the source's tokenizer files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wide.config.dtype = next(wide.parameters()).dtype
    wide.save_pretrained(out, max_shard_size=max_shard_size)
    for name in TOKENIZER_FILES:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, out / name)
    if provenance is not None:
        (out / "widened_from.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out


def cast_parameters(model, dtype: torch.dtype):
    """Parameters to `dtype`, one at a time (no second full copy); buffers such as the rotary frequencies stay
    float32, as from_pretrained(dtype=...) leaves them (Module.to would round them too)."""
    for p in model.parameters():  # a tied weight is one Parameter, listed once
        p.data = p.data.to(dtype)
    model.config.dtype = dtype
    return model


def sha256_of(paths: list[Path]) -> dict:
    out = {}
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
        out[path.name] = digest.hexdigest()
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, type=Path, help="the small target's checkpoint dir")
    p.add_argument("--shape", required=True, help=f"{' | '.join(SHAPES)}, or a JSON object of {', '.join(SHAPE_KEYS)}")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", default="bfloat16", help="the saved dtype (the check always runs in float32 first)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--check-prompts", type=int, default=100, help="HumanEval prompts to compare logits on (0: none)")
    p.add_argument("--report", type=Path, help="write the JSON report here")
    p.add_argument("--fill", choices=("random", "zeros"), default="random", help="what the free weights hold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", default="4GB")
    a = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    with contextlib.suppress(Exception):
        from cast_models.train_reference import _quiet_transformers

        _quiet_transformers()
    t_start = time.monotonic()
    device = torch.device(a.device)
    save_dtype = getattr(torch, a.dtype)
    torch.set_float32_matmul_precision("highest")  # no TF32: the float32 check should be float32
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        sync(device)
        now = time.monotonic()
        timings[name] = round(now - since, 3)
        print(f"[{now - t_start:7.1f}s] {name}: {now - since:.1f} s", file=sys.stderr, flush=True)
        return now

    t = time.monotonic()
    small = AutoModelForCausalLM.from_pretrained(a.source, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(a.source)
    texts, text_source = check_texts(a.check_prompts) if a.check_prompts > 0 else ([], "none")
    limit = small.config.max_position_embeddings
    token_lists = [ids[:limit] for ids in (tok(q)["input_ids"] for q in texts) if ids]
    t = lap("load_small_s", t)

    shape = resolve_shape(a.shape)
    wide = widen(small, shape, fill=a.fill, seed=a.seed, dtype=torch.float32 if token_lists else save_dtype,
                 device=device)
    t = lap("build_s", t)
    wc = wide.config
    report: dict = {
        "source": str(a.source),
        "shape_name": a.shape if a.shape in SHAPES else "custom",
        "shape": {k: getattr(wc, k) for k in SHAPE_KEYS},
        "rms_norm_eps": wc.rms_norm_eps,
        "residual_copies": residual_copies(small.config.hidden_size, wc.hidden_size),
        "norm_scale": math.sqrt(residual_copies(small.config.hidden_size, wc.hidden_size)
                                * small.config.hidden_size / wc.hidden_size),
        "layer_positions": layer_positions(small.config.num_hidden_layers, wc.num_hidden_layers),
        "fill": a.fill,
        "seed": a.seed,
        "saved_dtype": a.dtype,
        "check_prompts": {"source": text_source, "count": len(token_lists)},
    }
    checks: dict[str, dict] = {}
    if token_lists:
        checks["wide_vs_small_float32"] = compare_logits(small, wide, token_lists)
        t = lap("check_float32_s", t)
        print(f"float32: {json.dumps(checks['wide_vs_small_float32'])}", file=sys.stderr, flush=True)
    if next(wide.parameters()).dtype != save_dtype:
        cast_parameters(wide, save_dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t = lap("convert_s", t)
    if token_lists and save_dtype != torch.float32:
        # Both in the saved dtype: what serving sees. The noise floor: the small model against itself in float32.
        small_lp = cast_parameters(copy.deepcopy(small), save_dtype)
        checks[f"wide_vs_small_{a.dtype}"] = compare_logits(small_lp, wide, token_lists)
        checks[f"small_{a.dtype}_vs_small_float32"] = compare_logits(small, small_lp, token_lists)
        t = lap(f"check_{a.dtype}_s", t)
        print(f"{a.dtype}: {json.dumps(checks[f'wide_vs_small_{a.dtype}'])}", file=sys.stderr, flush=True)
    report["checks"] = checks
    report.update(weight_stats(wide))
    t = lap("stats_s", t)

    source_files = sorted(a.source.glob("*.safetensors"))
    provenance = {k: report[k] for k in ("source", "shape_name", "shape", "residual_copies", "norm_scale",
                                         "layer_positions", "fill", "seed", "saved_dtype")}
    provenance["source_sha256"] = sha256_of(source_files)
    provenance["tool"] = "python -m benchmarks.widen_target " + " ".join(sys.argv[1:] if argv is None else argv)
    probe = torch.tensor([token_lists[0] if token_lists else [0, 1, 2, 3]], device=device)
    with torch.inference_mode():
        probe_logits = wide(input_ids=probe).logits.float().cpu()
    save_widened(wide, a.source, a.out, a.max_shard_size, provenance)
    t = lap("save_s", t)
    report["disk_bytes"] = sum(f.stat().st_size for f in a.out.glob("*.safetensors"))
    report["shards"] = len(list(a.out.glob("*.safetensors")))

    # Reload what was written, as the verifier will, and check it computes what the in-memory model did.
    del wide
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(a.out, dtype=save_dtype, device_map=str(device))
    except Exception:  # noqa: BLE001 - older loaders without device_map support: load on CPU and move
        reloaded = AutoModelForCausalLM.from_pretrained(a.out, dtype=save_dtype).to(device)
    with torch.inference_mode():
        again = reloaded.eval()(input_ids=probe).logits.float().cpu()
    report["reload_max_abs_diff"] = (again - probe_logits).abs().max().item()
    t = lap("reload_s", t)
    timings["total_s"] = round(time.monotonic() - t_start, 3)
    report["seconds"] = timings
    report["env"] = {
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    text = json.dumps(report, indent=2)
    if a.report:
        a.report.parent.mkdir(parents=True, exist_ok=True)
        a.report.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
