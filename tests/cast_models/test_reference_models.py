"""The committed reference pair (models/reference) loads with plain transformers and has its documented geometry."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

REF = Path(__file__).resolve().parents[2] / "models" / "reference"
pytestmark = pytest.mark.skipif(not (REF / "target" / "model.safetensors").exists(), reason="no reference pair")


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cast_models.train_reference import _quiet_transformers

    _quiet_transformers()
    tok = AutoTokenizer.from_pretrained(REF / "target")
    target = AutoModelForCausalLM.from_pretrained(REF / "target", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(REF / "draft", dtype=torch.float32).eval()
    return tok, target, draft


def test_geometry_and_tokens(pair):
    tok, target, draft = pair
    assert (REF / "draft" / "tokenizer.json").read_bytes() == (REF / "target" / "tokenizer.json").read_bytes()
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and len(tok) == 8192
    t, d = target.config, draft.config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (512, 6, 4, 1)
    assert t.head_dim == 128 and d.head_dim == 128 and t.vocab_size == d.vocab_size == 8192
    rope = t.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0 and rope["factor"] == 8.0
    assert t.eos_token_id == d.eos_token_id == 0 == target.generation_config.eos_token_id
    assert sum(p.numel() for p in target.parameters()) == 17_570_304
    assert sum(p.numel() for p in draft.parameters()) == 3_671_296


def test_greedy_completion_looks_like_python(pair):
    tok, target, draft = pair
    ids = tok("def fibonacci(n):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        text = tok.decode(out[0], skip_special_tokens=True)
        assert text.startswith("def fibonacci(n):\n    ")
        # the draft's greedy next token agrees with the target's along the target's continuation, mostly
        t_next = target(input_ids=out).logits[0, ids.shape[1] - 1 : -1].argmax(-1)
        d_next = draft(input_ids=out).logits[0, ids.shape[1] - 1 : -1].argmax(-1)
    assert (t_next == out[0, ids.shape[1] :]).all()
    assert (t_next == d_next).float().mean() >= 0.5


def test_the_configs_load_without_warnings_and_keep_llama31_frequencies():
    """transformers 5 warned three times at every start that original_max_position_embeddings (8192) was not below
    max_position_embeddings (2048). The configs now say Llama-3.1's rope with the original length and both frequency
    factors divided by 8: the same frequencies, bit for bit (so the same logits), and no warning."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from cast_models.train_reference import LLAMA31_ROPE_SCALING, LLAMA31_ROPE_THETA

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root
    logger.addHandler(handler)
    try:
        configs = [AutoConfig.from_pretrained(REF / role) for role in ("target", "draft")]
        AutoTokenizer.from_pretrained(REF / "target")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    for config in configs:
        llama31 = copy.deepcopy(config)
        llama31.rope_parameters = {**LLAMA31_ROPE_SCALING, "rope_theta": LLAMA31_ROPE_THETA}
        ours, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](llama31, "cpu")
        assert torch.equal(ours, theirs)
        unscaled = 1.0 / LLAMA31_ROPE_THETA ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
        assert (ours < unscaled).any()  # the scaling is in effect: low frequencies divided by the factor
