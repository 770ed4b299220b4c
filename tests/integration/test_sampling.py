"""Lossless sampling through the whole service: three processes on loopback, the target drafting for itself (so
trees are accepted often and the acceptance path is exercised), against the exact distribution that the target
alone samples from, computed here with the HF model and HF's own logits warpers.

For each drafting policy and each setting, thousands of seeded Generate calls give samples of the first two tokens.
Chi-square goodness of fit: the first token against p(t1), then the second against p(t2 | t1) for the first tokens
frequent enough to test. Categories with an expected count under 5 are pooled. Any sample of probability 0 (cut by
top-k or top-p) fails outright. A planted bug, run through the same harness in-process, shows the test rejects it.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from cast.v1 import generation_pb2, generation_pb2_grpc
from cast_core.tree import TokenTree
from orchestrator.policies import POLICIES
from verify_service.acceptance import Acceptance, children_of
from verify_service.sampling import SamplingParams, target_tokens
from verify_service.target import TargetModel
from verify_service.verifier import PrefillItem, Verifier, VerifyItem

DRAFTING_POLICIES = [name for name, policy in POLICIES.items() if policy.uses_draft]
# Per test. About 5 tests per policy of one draft (a first-token test and one or two conditionals per setting), 2-3
# per cascade policy (draft levels: one setting each, to keep the suite's time), ~30 in this file: the family-wise
# chance of a false alarm stays under 0.3%. Seeds are fixed, so on one deployment the
# outcome is deterministic, not flaky.
ALPHA = 1e-4
SAMPLES = 1000  # per policy and setting
MIN_CONDITIONAL = 150  # expected samples of a first token before its second token is tested
CONCURRENCY = 8


@dataclass(frozen=True)
class Setting:
    name: str
    prompt: str  # chosen so that the tiny target's first tokens are not too flat, for power
    temperature: float
    top_p: float = 1.0
    top_k: int = 0


SETTINGS = [
    Setting("t1.0-top_p0.8", "\n", temperature=1.0, top_p=0.8),
    Setting("t0.7-top_k12", "d", temperature=0.7, top_k=12),
]


@pytest.fixture(scope="module")
def stub(stack_factory):
    with grpc.insecure_channel(stack_factory("target-as-draft").spec.address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="module")
def hf_target(tiny_pair):
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float64).eval()
    return model, AutoTokenizer.from_pretrained(tiny_pair[0])


# The exact distribution, with HF's warpers (not ours), in HF's order.


def exact_next_token(model, ids: list[int], setting: Setting) -> np.ndarray:
    """[V] the probabilities the target alone samples the token after `ids` from."""
    with torch.no_grad():
        scores = model(torch.tensor([ids])).logits[:, -1]  # [1, V]
    scores = TemperatureLogitsWarper(setting.temperature)(None, scores)
    if setting.top_k:
        scores = TopKLogitsWarper(setting.top_k)(None, scores)
    if setting.top_p < 1.0:
        scores = TopPLogitsWarper(setting.top_p)(None, scores)
    return scores.softmax(-1)[0].numpy()


def chi_square_p_value(tokens: list[int], probs: np.ndarray) -> float:
    """Goodness of fit of the tokens to probs ([V]); rare categories pooled; 0 if any token has probability 0."""
    n = len(tokens)
    observed = np.bincount(tokens, minlength=probs.shape[0])
    if observed[probs == 0].any():
        return 0.0
    expected = n * probs
    frequent = expected >= 5
    obs, exp = list(observed[frequent]), list(expected[frequent])
    rare = expected[~frequent].sum()
    if rare >= 5:
        obs.append(observed[~frequent].sum())
        exp.append(rare)
    elif exp:  # too little to stand alone: fold it into the smallest category
        j = int(np.argmin(exp))
        obs[j] += observed[~frequent].sum()
        exp[j] += rare
    if len(exp) < 2:
        return 1.0
    obs, exp = np.asarray(obs, dtype=np.float64), np.asarray(exp)
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def distribution_p_values(model, prompt_ids: list[int], setting: Setting, pairs: list[tuple[int, int]]) -> dict[str, float]:
    """{test name: p-value}: the first token, then the second given each frequent first token."""
    p1 = exact_next_token(model, prompt_ids, setting)
    out = {"t1": chi_square_p_value([a for a, _ in pairs], p1)}
    for first in np.flatnonzero(len(pairs) * p1 >= MIN_CONDITIONAL):
        seconds = [b for a, b in pairs if a == first]
        out[f"t2|t1={first}"] = chi_square_p_value(seconds, exact_next_token(model, prompt_ids + [int(first)], setting))
    return out


# Through the service.


def generate_request(setting: Setting, policy: str, seed: int | None, max_new_tokens: int) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        prompt=setting.prompt, max_new_tokens=max_new_tokens, policy=policy, ignore_eos=True, seed=seed,
        temperature=setting.temperature, top_p=setting.top_p, top_k=setting.top_k, return_step_stats=True,
    )


def step_verifying(response: generation_pb2.GenerateResponse, index: int) -> generation_pb2.StepStats:
    """The step that emitted the response's token at `index`."""
    emitted = 0
    for step in response.stats.step_stats:
        emitted += step.accepted_tokens
        if emitted > index:
            return step
    raise AssertionError(f"no step emitted token {index}")


def generate_many(stub, requests: list[generation_pb2.GenerateRequest]) -> list[generation_pb2.GenerateResponse]:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(lambda r: stub.Generate(r, timeout=60), requests))


CASES = [(policy, setting) for policy in DRAFTING_POLICIES for setting in SETTINGS
         if not POLICIES[policy].levels or setting is SETTINGS[0]]


@pytest.mark.parametrize(("policy", "setting"), CASES, ids=[f"{p}-{s.name}" for p, s in CASES])
def test_samples_follow_the_targets_distribution(stub, hf_target, policy, setting):
    model, tokenizer = hf_target
    # Distinct seeds per test: one seed gives one output under every policy, so shared seeds would repeat samples.
    base = 1_000_000 * (10 * DRAFTING_POLICIES.index(policy) + SETTINGS.index(setting) + 1)
    responses = generate_many(stub, [generate_request(setting, policy, base + i, 2) for i in range(SAMPLES)])
    pairs = [tuple(r.token_ids) for r in responses]
    assert all(len(p) == 2 for p in pairs)
    mean_accepted = np.mean([r.stats.mean_accepted_length for r in responses])
    if policy in ("eagle2", "chain", "cascade-fixed"):  # fixed trees: every sample went through the acceptance rule
        # The step that emitted each request's second token verified a drafted tree: its first step too, or it
        # joined a running batch with its root alone (a plain step); which of the two is timing, not the test's.
        assert all(step_verifying(r, 1).verified_nodes > 1 for r in responses)
    assert mean_accepted >= 1.0
    p_values = distribution_p_values(model, tokenizer.encode(setting.prompt, add_special_tokens=False), setting, pairs)
    assert len(p_values) >= 2
    assert min(p_values.values()) > ALPHA, p_values


# Reproducibility and tree-shape independence.


def sample_reference(model, prompt_ids: list[int], new_tokens: int, params: SamplingParams) -> list[int]:
    """The target's own autoregressive sampling with the service's (seed, position) stream."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1:]  # [1, V]
            ids += target_tokens(logits, np.zeros(1, dtype=np.int64), len(ids), params, params.seed).tolist()
    return ids[len(prompt_ids):]


def test_a_seed_gives_one_output_under_every_policy(stub, hf_target):
    model, tokenizer = hf_target
    setting = Setting("t0.9-top_k40", "def fibonacci(n):", temperature=0.9, top_k=40)
    prompt_ids = tokenizer.encode(setting.prompt, add_special_tokens=False)
    for seed in (7, 2**63 + 5):
        expected = sample_reference(model, prompt_ids, 24, SamplingParams(0.9, 1.0, 40, seed))
        policies = [*POLICIES, *DRAFTING_POLICIES]  # each drafting policy twice: the same request again
        responses = generate_many(stub, [generate_request(setting, p, seed, 24) for p in policies])
        for policy, response in zip(policies, responses):
            assert list(response.token_ids) == expected, (policy, seed)
            assert response.stats.mean_accepted_length >= 1.0
        # The target drafting for itself: fixed trees' drafts are accepted (a step emits more than its bonus token).
        fixed = [r for p, r in zip(policies, responses) if p in ("eagle2", "chain", "cascade-fixed")]
        assert any(step.accepted_tokens > 1 for r in fixed for step in r.stats.step_stats)
    unseeded = generate_many(stub, [generate_request(setting, "eagle2", None, 24) for _ in range(2)])
    assert unseeded[0].token_ids != unseeded[1].token_ids


# A planted bug must fail the same harness. In-process: a Verifier on the target, the first step verifying the
# target's own top-k tree (as a target-as-draft expansion would), later steps the root alone.


def accept_first_child_always(tree: TokenTree, chosen: np.ndarray) -> Acceptance:
    """Wrong: follows the first child whatever the target drew."""
    children = children_of(tree)
    node, path = 0, []
    while children[node]:
        node = children[node][0]
        path.append(node)
    return Acceptance(path, [int(tree.tokens[i]) for i in path] + [int(chosen[node])])


def top_k_tree(model, prompt_ids: list[int], k: int, depth: int) -> TokenTree:
    tokens, parents, depths, paths = [prompt_ids[-1]], [-1], [0], [()]
    for parent in itertools.count():
        if parent == len(tokens) or depths[parent] == depth:
            break
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + list(paths[parent])])).logits[0, -1]
        for token in logits.topk(k).indices.tolist():
            tokens.append(token)
            parents.append(parent)
            depths.append(depths[parent] + 1)
            paths.append(paths[parent] + (token,))
    return TokenTree.from_lists(tokens, parents, depths, [1.0] * len(tokens))


def sample_in_process(verifier: Verifier, prompt_ids: list[int], first_tree: TokenTree, params: SamplingParams,
                      seeds: range) -> list[tuple[int, int]]:
    pairs = []
    for seed in seeds:
        verifier.prefill([PrefillItem("s", prompt_ids)])
        out, tree = [], first_tree
        while len(out) < 2:
            (result,), _ = verifier.verify([VerifyItem("s", tree, SamplingParams(params.temperature, params.top_p, params.top_k, seed))])
            out += result.committed_tokens
            tree = TokenTree.root_only(out[-1])
        verifier.release(["s"])
        pairs.append((out[0], out[1]))
    return pairs


def test_the_harness_rejects_a_planted_bug(tiny_pair, hf_target, monkeypatch):
    model, tokenizer = hf_target
    setting = SETTINGS[1]
    prompt_ids = tokenizer.encode(setting.prompt, add_special_tokens=False)
    verifier = Verifier(TargetModel.load(tiny_pair[0], dtype="float64", device="cpu"), max_batch=4, session_ttl_s=60)
    params = SamplingParams(setting.temperature, setting.top_p, setting.top_k)
    tree = top_k_tree(model, prompt_ids, k=4, depth=2)
    seeds = range(SAMPLES // 2)  # plenty: the bug is gross, and the real rule must pass on the same seeds
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards gain nothing from two threads, and two stall on a throttled shared box
    try:
        correct = sample_in_process(verifier, prompt_ids, tree, params, seeds)
        monkeypatch.setattr("verify_service.verifier.accept_matching", accept_first_child_always)
        wrong = sample_in_process(verifier, prompt_ids, tree, params, seeds)
    finally:
        torch.set_num_threads(threads)
    p_correct = distribution_p_values(model, prompt_ids, setting, correct)
    assert min(p_correct.values()) > ALPHA, p_correct
    p_wrong = distribution_p_values(model, prompt_ids, setting, wrong)
    assert min(p_wrong.values()) < ALPHA, p_wrong
