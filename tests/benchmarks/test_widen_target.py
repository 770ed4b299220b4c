"""benchmarks/widen_target: the widened model computes the small model's logits, saves as a normal checkpoint, and the
named shapes have Llama-3.1-8B's / Llama-3.2-1B's per-layer sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from benchmarks.widen_target import (
    SHAPES,
    cast_parameters,
    compare_logits,
    layer_positions,
    main,
    residual_copies,
    save_widened,
    weight_stats,
    widen,
)

REF = Path(__file__).resolve().parents[2] / "models" / "reference" / "target"
# Like the reference target: 4 query heads on 1 KV head, tied embeddings, llama3 rope.
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, max_position_embeddings=256,
             rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=8192),
             initializer_range=0.2)
# 8b-like: 8x wider (two residual copies), GQA group 4 = the small group, untied head, more layers.
GQA = dict(hidden_size=512, num_hidden_layers=7, num_attention_heads=32, num_key_value_heads=8, head_dim=16,
           intermediate_size=448, tie_word_embeddings=False)
# 8b-like at 4x (one residual copy, zero padding, norm scale 1/2).
GQA4 = dict(GQA, hidden_size=256)
# 1b-like with 8 KV heads: group 2, so the small KV head is duplicated into wide KV heads 0 and 1.
DUP = dict(hidden_size=256, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
           intermediate_size=256, tie_word_embeddings=True)


def tiny_small(dtype=torch.float32, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).to(dtype).eval()
    with torch.no_grad():  # norms away from 1, so a wrong norm scale would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def random_ids(n_seqs=3, length=40, vocab=256, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n_seqs)]


def test_norm_scale_and_layers():
    assert residual_copies(512, 4096) == 2  # 4096 / (2 * 512) = 4: norm scale 1/2
    assert residual_copies(512, 2048) == 1  # 2048 / 512 = 4
    assert residual_copies(512, 1024) == 2  # one full copy each: scale 1
    assert residual_copies(512, 1536) == 3  # three copies fill the stream: scale 1
    assert residual_copies(512, 1280) == 1  # no power of 4 reachable: irrational scale, still correct
    assert layer_positions(6, 32) == [0, 5, 10, 16, 21, 26]
    assert layer_positions(6, 6) == list(range(6))


@pytest.mark.parametrize("shape", [GQA4, DUP], ids=["gqa-8b-like", "dup-kv-1b-like"])
@pytest.mark.parametrize("fill", ["random", "zeros"])
def test_logits_match_float64(shape, fill):
    """Bit-for-bit up to float64 rounding. (With two residual copies, as 8b has, the float32 RMSNorm that
    transformers runs even in a float64 model sums twice the squares in another order: ~1e-7, tested below.)"""
    small = tiny_small(torch.float64)
    wide = widen(small, shape, fill=fill)
    assert next(wide.parameters()).dtype == torch.float64
    r = compare_logits(small, wide, random_ids())
    assert r["max_abs_diff"] < 1e-12 * max(1.0, r["max_abs_logit"]), r
    assert r["argmax_agreement"] == 1.0


@pytest.mark.parametrize("shape", [GQA, DUP], ids=["gqa-8b-like-two-copies", "dup-kv-1b-like"])
def test_logits_match_float32_and_weights_are_not_mostly_zero(shape):
    small = tiny_small()
    wide = widen(small, shape)
    r = compare_logits(small, wide, random_ids())
    assert r["max_abs_diff"] < 1e-5, r
    assert r["argmax_agreement"] == 1.0
    # the random fill leaves only the forced zeros (v and up of dead units, writers into unused channels)
    assert weight_stats(wide)["zero_fraction"] < 0.5
    assert weight_stats(widen(small, shape, fill="zeros"))["zero_fraction"] > 0.75
    if shape["tie_word_embeddings"]:
        assert wide.lm_head.weight is wide.model.embed_tokens.weight
    else:
        assert wide.lm_head.weight.data_ptr() != wide.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("where", ["dead-kv-value", "unused-channel", "copy-channel-norm"])
def test_check_detects_a_broken_padding(where):
    """The forced zeros matter and the comparison sees it: break one and the logits move."""
    small = tiny_small()
    wide = widen(small, GQA)
    layer = wide.model.layers[0]
    with torch.no_grad():
        if where == "dead-kv-value":  # heads on a dead KV head would output noise through their o_proj columns
            layer.self_attn.v_proj.weight[-1] = 0.5
        elif where == "unused-channel":  # a real MLP unit writing into a channel that must stay 0
            layer.mlp.down_proj.weight[-1, :96] = 0.5
        else:  # the second residual copy leaking into the readers
            wide.model.norm.weight[64:128] = 1.0
    assert compare_logits(small, wide, random_ids())["max_abs_diff"] > 1e-2


def test_refuses_shapes_that_cannot_embed():
    small = tiny_small()
    with pytest.raises(ValueError, match="GQA group"):
        widen(small, dict(GQA, num_key_value_heads=4))  # group 8 > the small group 4
    with pytest.raises(ValueError, match="head_dim"):
        widen(small, dict(GQA, head_dim=32, num_attention_heads=16))
    with pytest.raises(ValueError, match="unknown shape"):
        widen(small, dict(GQA, vocab_size=512))


@pytest.mark.parametrize("name,real_non_embedding", [("8b", 6_979_588_096), ("1b", 973_146_112)])
def test_named_shapes_have_the_real_models_sizes(name, real_non_embedding):
    """Built on the meta device (no memory): per-layer sizes equal Llama-3.1-8B's / Llama-3.2-1B's, whose
    non-embedding parameter counts are 8,030,261,248 - 2 x 128256 x 4096 and 1,235,814,400 - 128256 x 2048."""
    source = LlamaConfig(**dict(SMALL, vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                                head_dim=128, rms_norm_eps=1e-5))
    with torch.device("meta"):
        small = LlamaForCausalLM(source)
    wide = widen(small, name, fill="zeros", device="meta")
    c = wide.config
    for key, value in SHAPES[name].items():
        assert getattr(c, key) == value
    assert c.rms_norm_eps == pytest.approx(2.5e-6)  # eps x (copies x 512 / hidden) = eps / 4 for both
    embeddings = (1 if c.tie_word_embeddings else 2) * 8192 * c.hidden_size
    assert sum(p.numel() for p in wide.parameters()) - embeddings == real_non_embedding


def test_saved_dir_loads_with_the_shape(tmp_path):
    small = tiny_small()
    wide = widen(small, GQA)
    src = tmp_path / "small"
    small.save_pretrained(src)
    (src / "tokenizer.json").write_text('{"stand-in": true}')
    cast_parameters(wide, torch.bfloat16)
    out = save_widened(wide, src, tmp_path / "wide", max_shard_size="300KB", provenance={"x": 1})
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "widened_from.json").read_text()) == {"x": 1}
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    c = loaded.config
    assert {k: getattr(c, k) for k in GQA} == GQA
    assert loaded.dtype == torch.bfloat16 and c.rms_norm_eps == pytest.approx(1e-6 / 4)
    ids = random_ids(1)
    x = torch.tensor(ids)
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=x).logits, wide(input_ids=x).logits)
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


@pytest.mark.skipif(not (REF / "model.safetensors").exists(), reason="no reference target")
def test_reference_target_widened_matches_on_code():
    from cast_models.train_reference import _quiet_transformers

    _quiet_transformers()
    small = AutoModelForCausalLM.from_pretrained(REF, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(REF)
    text = Path(json.__file__).read_text()[:1500]  # real Python source, like the training corpus
    ids = [tok(text)["input_ids"]]
    shape = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=1536, tie_word_embeddings=False)
    wide = widen(small, shape)
    r = compare_logits(small, wide, ids)
    assert r["positions"] > 300 and r["max_abs_logit"] > 5
    assert r["max_abs_diff"] < 1e-4 and r["argmax_agreement"] == 1.0, r


@pytest.mark.skipif(not (REF / "model.safetensors").exists(), reason="no reference target")
def test_cli_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("CAST_HUMANEVAL", str(tmp_path / "missing.jsonl.gz"))  # falls back to built-in snippets
    shape = json.dumps(dict(hidden_size=1024, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1,
                            intermediate_size=1024))
    report = tmp_path / "report.json"
    assert main(["--source", str(REF), "--shape", shape, "--out", str(tmp_path / "w"), "--device", "cpu",
                 "--check-prompts", "2", "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["check_prompts"] == {"source": "builtin", "count": 2}
    f32, bf16 = r["checks"]["wide_vs_small_float32"], r["checks"]["wide_vs_small_bfloat16"]
    assert f32["dtype"] == "float32" and f32["max_abs_diff"] < 1e-4 and f32["argmax_agreement"] == 1.0
    assert bf16["dtype"] == "bfloat16" and bf16["argmax_agreement"] > 0.9
    assert r["checks"]["small_bfloat16_vs_small_float32"]["max_abs_diff"] > 0  # the rounding floor is measured
    assert r["reload_max_abs_diff"] == 0.0
    assert r["bytes"] == 2 * r["params"] and r["disk_bytes"] >= r["bytes"]
    assert r["layer_positions"] == [0, 1, 2, 3, 4, 5] and r["residual_copies"] == 2 and r["norm_scale"] == 1.0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "w")
    assert loaded.config.hidden_size == 1024 and (tmp_path / "w" / "tokenizer.json").exists()
