"""The `sparse` draft level: the target itself with some of its decoder layers skipped (CAS-Spec's layer sparsity),
no training. Which layers stay is measured: starting from all of them, drop one at a time the layer whose removal
keeps the most top-1 agreement with the full target on held-out text, down to the layer count asked for. The result
is written as an ordinary checkpoint (the kept layers' weights, renumbered) with `sparse.json` saying which layers
and the agreement measured; the draft service exports it to ONNX like any draft.

    python -m draft_service.sparse --target DIR [--layers N] [--calibration FILE] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

from cast_runtime.cache import default_cache_dir

SPARSE_FILE = "sparse.json"
FORMAT = 1
CALIBRATION_TOKENS = 1024  # held-out tokens the agreement is measured on (windows of WINDOW)
WINDOW = 256
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass(frozen=True)
class SparseChoice:
    target: str               # the target checkpoint's directory name
    target_layers: int
    layers: list[int]         # the target's layers kept, in order
    agreement: float          # top-1 agreement with the full target on the calibration text
    calibration: str          # what that text was
    calibration_tokens: int


def is_holdout(name: str, seed: int = 0, percent: float = 1.0) -> bool:
    """cast_models.train_reference's rule for held-out files (repeated here: that module imports torch, and a
    cached sparse level starts without it)."""
    key = hashlib.sha256(f"holdout\0{seed}\0{name}".encode()).digest()
    return int.from_bytes(key[:8], "big") % 10000 < round(percent * 100)


def heldout_stdlib_text(max_chars: int = 20_000) -> tuple[str, str]:
    """(text, description): standard-library files that the reference pair's training held out (its seed 0, 1 %),
    so that the reference target is measured on text it never trained on. Any text works for other targets."""
    root = Path(sysconfig.get_paths()["stdlib"])
    picked, text = [], ""
    for path in sorted(root.rglob("*.py")):
        name = f"stdlib/{path.relative_to(root).as_posix()}"
        if "site-packages" in name or not is_holdout(name):
            continue
        try:
            text += path.read_text() + "\n"
        except (OSError, UnicodeDecodeError):
            continue
        picked.append(name)
        if len(text) >= max_chars:
            break
    return text, f"{len(picked)} held-out stdlib files of the reference pair ({picked[0]}, ...)"


def _windows(tokenizer, text: str):
    import torch

    ids = tokenizer.encode(text, add_special_tokens=False)[:CALIBRATION_TOKENS]
    n = len(ids) // WINDOW
    if n == 0:
        raise ValueError(f"calibration text has {len(ids)} tokens, at least {WINDOW} needed")
    return torch.tensor(ids[: n * WINDOW]).view(n, WINDOW)  # [N, WINDOW]


def agreement(model, all_layers, keep: list[int], windows, reference) -> float:
    """Top-1 agreement of the model run with only `keep` layers against the full model's argmax `reference`."""
    import torch

    model.model.layers = torch.nn.ModuleList([all_layers[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    with torch.no_grad():
        guess = model(input_ids=windows, use_cache=False).logits.argmax(-1)  # [N, WINDOW]
    return float((guess == reference).float().mean())


def choose_layers(target_dir: Path, layers: int, text: str) -> tuple[list[int], float, int]:
    """Greedy layer removal by agreement. Returns (kept layers, their agreement, calibration tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    windows = _windows(tokenizer, text)
    all_layers = list(model.model.layers)
    full = len(all_layers)
    if not 1 <= layers <= full:
        raise ValueError(f"layers: {layers} is outside [1, {full}] (the target has {full})")
    with torch.no_grad():
        reference = model(input_ids=windows, use_cache=False).logits.argmax(-1)
    keep, score = list(range(full)), 1.0
    while len(keep) > layers:
        # The first and last layers are tried too: nothing is assumed about which layers matter.
        trials = [(agreement(model, all_layers, [i for i in keep if i != drop], windows, reference), drop)
                  for drop in keep]
        score, drop = max(trials)
        keep.remove(drop)
    return keep, score, int(windows.numel())


def sparse_key(target_dir: Path, layers: int, text: str) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT, "layers": layers}).encode())
    h.update(hashlib.sha256(text.encode()).digest())
    for path in sorted(p for p in target_dir.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(target_dir)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:24]


def build_sparse_checkpoint(target_dir: str | Path, layers: int = 0, calibration: str | Path | None = None,
                            cache_dir: str | Path | None = None, out_dir: str | Path | None = None) -> Path:
    """The sparse checkpoint of a target (cached by content hash): layers 0 keeps two thirds of the target's layers
    (rounded up); calibration: a text file (None: the reference pair's held-out stdlib files)."""
    target_dir = Path(target_dir)
    config = json.loads((target_dir / "config.json").read_text())
    full = config.get("num_hidden_layers") or config["text_config"]["num_hidden_layers"]
    layers = layers or -(-2 * full // 3)
    if calibration is None:
        text, described = heldout_stdlib_text()
    else:
        text, described = Path(calibration).read_text(), str(calibration)
    out = Path(out_dir) if out_dir else Path(cache_dir or default_cache_dir()) / "sparse" / sparse_key(
        target_dir, layers, text)
    if (out / SPARSE_FILE).is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    keep, score, tokens = choose_layers(target_dir, layers, text)

    model = AutoModelForCausalLM.from_pretrained(target_dir).eval()  # the checkpoint's own dtype
    kept = [model.model.layers[i] for i in keep]
    for new_index, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_index
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (target_dir / name).is_file():
            shutil.copy(target_dir / name, tmp / name)
    choice = SparseChoice(target_dir.resolve().name, full, keep, score, described, tokens)
    (tmp / SPARSE_FILE).write_text(json.dumps(asdict(choice), indent=2))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except OSError:  # another process built the same one first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_choice(checkpoint: str | Path) -> SparseChoice | None:
    path = Path(checkpoint) / SPARSE_FILE
    return SparseChoice(**json.loads(path.read_text())) if path.is_file() else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m draft_service.sparse", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=Path, required=True)
    p.add_argument("--layers", type=int, default=0, help="layers to keep (0: two thirds of the target's, rounded up)")
    p.add_argument("--calibration", type=Path, help="held-out text file (default: the reference's held-out stdlib)")
    p.add_argument("--out", type=Path, help="write the checkpoint here (default: the cache)")
    a = p.parse_args(argv)
    out = build_sparse_checkpoint(a.target, a.layers, a.calibration, out_dir=a.out)
    print(out)
    print(json.dumps(asdict(load_choice(out)), indent=2))


if __name__ == "__main__":
    main()
