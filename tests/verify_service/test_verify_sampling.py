"""Sampling: HF's logits processing, the (seed, position) stream, and sample-then-match over trees.

The central property: for a seed, the committed tokens are those of plain autoregressive sampling with the same
(seed, position) stream, whatever trees the steps verify. Exactness of the distribution itself is checked through
the whole service in tests/integration/test_sampling.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from cast_core.tree import TokenTree
from verify_service.acceptance import accept_matching
from verify_service.sampling import SamplingParams, gumbel_noise, process_logits, target_tokens
from verify_service.target import TargetModel
from verify_service.verifier import PrefillItem, Verifier, VerifyItem

from verify_helpers import tree_with_path

SETTINGS = [
    SamplingParams(temperature=1.0, seed=11),
    SamplingParams(temperature=0.7, top_k=20, seed=12),
    SamplingParams(temperature=1.3, top_p=0.8, seed=13),
    SamplingParams(temperature=0.9, top_k=5, top_p=0.6, seed=14),
]


def hf_processed(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    scores = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
@pytest.mark.parametrize("top_k", [0, 1, 7, 100, 500])
@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.5, 1e-6])
def test_processing_matches_hf_warpers(dtype, temperature, top_k, top_p):
    g = torch.Generator().manual_seed(top_k * 1000 + int(top_p * 100))
    logits = (torch.randn(6, 100, generator=g, dtype=torch.float64) * 3).to(dtype)
    logits[0] = logits[0].round()  # ties at the top-k and top-p boundaries
    ours = process_logits(logits, temperature, top_k, top_p)
    theirs = hf_processed(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])
    assert (~torch.isinf(ours)).sum(-1).min() >= 1  # something always stays


def test_noise_depends_only_on_seed_and_position():
    a = gumbel_noise(5, range(10, 14), 64, torch.device("cpu"))  # [4, 64]
    b = gumbel_noise(5, range(12, 13), 64, torch.device("cpu"))  # [1, 64]
    assert torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, gumbel_noise(6, range(10, 14), 64, torch.device("cpu")))
    big = gumbel_noise(1, range(1), 200_000, torch.device("cpu"))
    assert abs(big.mean().item() - 0.5772) < 0.01 and abs(big.var().item() - math.pi**2 / 6) < 0.03  # Gumbel(0, 1)


def test_draws_follow_the_processed_distribution():
    """One position per node of a long chain, one distribution: the frequencies are p (chi-square, alpha 1e-4)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=torch.float64)
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.95)
    n = 20_000
    tokens = target_tokens(logits.expand(n, -1), np.arange(n), first_position=3, params=params, seed=99)
    p = process_logits(logits[None], params.temperature, params.top_k, params.top_p).softmax(-1)[0].numpy()
    counts = np.bincount(tokens, minlength=len(p))
    assert counts[p == 0].sum() == 0
    keep = p > 0
    stat = float((((counts - n * p) ** 2)[keep] / (n * p)[keep]).sum())
    dof = int(keep.sum()) - 1
    assert torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)).item() > 1e-4, (counts, n * p)


def test_greedy_is_argmax_whatever_top_k_and_top_p():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.0, top_k=3, top_p=0.1, seed=4)
    assert (target_tokens(logits, np.zeros(5, dtype=np.int64), 0, params) == logits.argmax(-1).numpy()).all()


def test_design_rule_emits_each_token_with_probability_p():
    """DESIGN's sequential rule (accept x w.p. p(x), else zero it and renormalise; bonus from the rest), computed
    exactly: each token leaves the node with probability p(x), as sample-then-match has it by construction."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.dirichlet(np.full(8, 0.5))
        children = list(rng.integers(0, 8, size=int(rng.integers(0, 6))))  # duplicates allowed
        out = np.zeros(8)
        reach, q = 1.0, p.copy()  # probability of reaching the next child; the current (renormalised) p
        for c in children:
            out[c] += reach * q[c]  # accepted here
            reach *= 1 - q[c]
            if q[c] < 1:
                q[c] = 0.0
                q = q / q.sum()
        out += reach * q  # the bonus, from what is left
        np.testing.assert_allclose(out, p, atol=1e-12)


# A stand-in for a model: the logits after a path are a fixed random function of the path.
VOCAB = 8


def fake_logits(path: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(path) & 0x7FFFFFFF)
    return torch.randn(VOCAB, generator=g, dtype=torch.float64) * 2


def random_tree(rng: np.random.Generator, committed: list[int], max_nodes: int) -> TokenTree:
    """Random shape; a child carries the fake model's argmax after its path half the time (a decent draft), else a
    random token (duplicates among siblings included)."""
    tokens, parents, depths, paths = [committed[-1]], [-1], [0], [()]
    for _ in range(int(rng.integers(0, max_nodes))):
        parent = int(rng.integers(len(tokens)))
        path = paths[parent]
        token = int(fake_logits(tuple(committed) + path).argmax()) if rng.random() < 0.5 else int(rng.integers(VOCAB))
        tokens.append(token)
        parents.append(parent)
        depths.append(depths[parent] + 1)
        paths.append(path + (token,))
    order = np.argsort(depths, kind="stable")  # parents before children
    new = np.empty(len(order), dtype=np.int64)
    new[order] = np.arange(len(order))
    return TokenTree.from_lists(
        [tokens[i] for i in order], [-1] + [int(new[parents[i]]) for i in order[1:]], [depths[i] for i in order],
        [1.0] * len(order),
    )


@pytest.mark.parametrize("params", SETTINGS, ids=str)
def test_any_tree_commits_what_autoregressive_sampling_draws(params):
    prompt, length = [1, 2, 3], 40
    autoregressive = list(prompt)
    while len(autoregressive) < len(prompt) + length:
        logits = fake_logits(tuple(autoregressive))[None]  # [1, V]
        autoregressive += target_tokens(logits, np.zeros(1, dtype=np.int64), len(autoregressive), params, params.seed).tolist()
    rng = np.random.default_rng(params.seed)
    committed, accepted = list(prompt), 0
    while len(committed) < len(prompt) + length:
        tree = random_tree(rng, committed, max_nodes=25)
        paths = [()]  # tokens below the root, per node
        for i in range(1, len(tree)):
            paths.append(paths[int(tree.parents[i])] + (int(tree.tokens[i]),))
        logits = torch.stack([fake_logits(tuple(committed) + path) for path in paths])  # [N, V]
        chosen = target_tokens(logits, tree.depths, len(committed), params, params.seed)
        result = accept_matching(tree, chosen)
        accepted += len(result.accepted_nodes)
        committed += result.committed_tokens
    assert committed[: len(autoregressive)] == autoregressive
    assert accepted >= 10  # trees were accepted into, not only bonus tokens


def sample_reference(target: TargetModel, prompt: list[int], new_tokens: int, params: SamplingParams) -> list[int]:
    """The target's own autoregressive sampling with the (seed, position) stream: full forwards, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = target.model(torch.tensor([ids])).logits[0, -1:]  # [1, V]
            ids += target_tokens(logits, np.zeros(1, dtype=np.int64), len(ids), params, params.seed).tolist()
    return ids[len(prompt):]


@pytest.mark.parametrize("params", SETTINGS[:3], ids=str)
def test_verifier_commits_the_targets_own_seeded_samples_for_any_tree(target64: TargetModel, params):
    rng = np.random.default_rng(0)
    prompts = [[7], rng.integers(1, target64.vocab_size, 9).tolist()]
    new_tokens = 20
    refs = [sample_reference(target64, p, new_tokens, params) for p in prompts]
    for mode in ("trees", "root_only"):
        verifier = Verifier(target64, max_batch=8, session_ttl_s=60)
        for s, (prompt, ref) in enumerate(zip(prompts, refs)):
            verifier.prefill([PrefillItem(f"s{s}", prompt)])
            committed, pending = [], prompt[-1]
            while len(committed) < len(ref):
                k = len(committed)
                depth = int(rng.integers(0, min(5, len(ref) - k))) if mode == "trees" else 0
                tree, path_nodes = tree_with_path(
                    rng, pending, ref[k : k + depth], ref[k + depth], target64.vocab_size,
                    int(rng.integers(0, 8)) if mode == "trees" else 0,
                )
                (result,), _ = verifier.verify([VerifyItem(f"s{s}", tree, params)])
                assert result.accepted_nodes == path_nodes
                committed += result.committed_tokens
                pending = result.bonus_token
            assert committed == ref, (mode, s)


def test_unseeded_sampling_runs_and_varies(target64: TargetModel):
    verifier = Verifier(target64, max_batch=8, session_ttl_s=60)
    outputs = set()
    for s in range(4):
        verifier.prefill([PrefillItem(f"u{s}", [7])])
        pending, out = 7, []
        for _ in range(8):
            (result,), _ = verifier.verify([VerifyItem(f"u{s}", TokenTree.root_only(pending), SamplingParams(temperature=2.0))])
            out += result.committed_tokens
            pending = result.bonus_token
        outputs.add(tuple(out))
    assert len(outputs) > 1
