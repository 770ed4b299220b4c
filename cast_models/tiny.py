"""Tiny random Llama-family model pairs that share one tokenizer: for tests and for a first start without weights.

The tokenizer is a byte-level BPE trained in about a second on a few standard-library sources, so any text
encodes and decodes, as with a real checkpoint.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
STDLIB_SAMPLES = ("functools.py", "textwrap.py", "string.py", "heapq.py", "bisect.py", "colorsys.py")


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in STDLIB_SAMPLES if (stdlib / name).exists()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None)


def tiny_llama_config(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, eos_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        # A wide init makes random logits peaked, so argmax is stable and drafts of the target itself agree.
        initializer_range=0.2,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )


def make_tiny_pair(out_dir: str | Path, seed: int = 0, vocab_size: int = 512) -> tuple[Path, Path]:
    """Write `target/` and `draft/` checkpoint directories (config, safetensors, tokenizer) under out_dir."""
    out = Path(out_dir)
    target_dir, draft_dir = out / "target", out / "draft"
    if (target_dir / "config.json").exists() and (draft_dir / "config.json").exists():
        return target_dir, draft_dir
    tokenizer = build_tokenizer(vocab_size)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    target = LlamaForCausalLM(tiny_llama_config(vocab, hidden=64, layers=2, heads=4, kv_heads=2, eos_id=eos))
    torch.manual_seed(seed + 1)
    draft = LlamaForCausalLM(tiny_llama_config(vocab, hidden=32, layers=1, heads=2, kv_heads=1, eos_id=eos))
    for model, path in ((target, target_dir), (draft, draft_dir)):
        model.generation_config.pad_token_id = eos
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return target_dir, draft_dir


if __name__ == "__main__":
    import sys

    print(*make_tiny_pair(sys.argv[1] if len(sys.argv) > 1 else "build/tiny"))
