"""The verify benchmarks run on the CPU and measure what they say: the step benchmark times both forwards, which
agree; the batch-layout benchmark's packed forward computes the same logits as the service's padded one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import verify_step
from benchmarks.verify_batch_layouts import pack_prefixes, packed_forward, ragged_tree
from verify_service.static_forward import StaticForward, static_store
from verify_service.target import TargetModel


def test_verify_step_times_every_cell_of_both_forwards(tiny_pair, tmp_path):
    out, table = tmp_path / "step.json", tmp_path / "profile.txt"
    verify_step.main(["--model", str(tiny_pair[0]), "--device", "cpu", "--dtype", "float32", "--batch", "1,2",
                      "--tokens", "1,4", "--context", "20", "--forwards", "service,transformers", "--repeats", "2",
                      "--warmup", "1", "--out", str(out), "--torch-profile", str(table)])
    report = json.loads(out.read_text())
    forwards = ("service", "transformers")
    assert {(r["mode"], r["batch"], r["tokens"]) for r in report["results"]} == {
        (m, b, n) for m in forwards for b in (1, 2) for n in (1, 4)}
    assert all(r["verify_ms"]["median"] > 0 and r["forward_ms"]["median"] > 0 for r in report["results"])
    assert "fused forward" in report["modes"]["service"]["layout"]
    assert "transformers' forward" in report["modes"]["transformers"]["layout"]
    for mode in forwards:  # float32 on the CPU: both forwards compute the same logits
        assert report["modes"][mode]["agreement_with_first_mode"]["max_abs_diff"] < 1e-4
        assert report["modes"][mode]["agreement_with_first_mode"]["argmax_agreement"] == 1.0
    assert "mode service, B=1, n=4" in table.read_text() and "self CPU" in table.read_text()


@pytest.fixture(scope="module")
def target64(tiny_pair) -> TargetModel:
    return TargetModel.load(tiny_pair[0], dtype="float64", device="cpu")


def test_the_packed_alternative_computes_the_same_logits(target64: TargetModel):
    """The packed forward (one row, block-diagonal mask) is a fair comparison: the padded forward's logits."""
    rng = np.random.default_rng(7)
    prefixes = [rng.integers(0, target64.vocab_size, c).tolist() for c in (4, 11, 1)]
    forward = StaticForward(target64, static_store(target64, 4, max_tree_tokens=16), max_tree_tokens=16)
    kvs = [forward.store.allocate() for _ in prefixes]
    target64.prefill(kvs, prefixes)
    trees = [ragged_tree(rng, n, target64.vocab_size) for n in (5, 1, 12)]
    padded = forward.tree_logits(kvs, trees)
    row = pack_prefixes(kvs, sum(map(len, prefixes)) + sum(map(len, trees)))
    packed = packed_forward(target64, row, [len(p) for p in prefixes], trees)[0]  # [sum N, V]
    torch.testing.assert_close(torch.cat(padded), packed, rtol=1e-9, atol=1e-9)
