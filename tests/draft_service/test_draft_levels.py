"""Draft levels without gRPC: prompt lookup, merging the levels' trees, level flags, the sparse checkpoint, and a
model level that sat out steps catching up from the shared history."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cast_core.errors import FailedPrecondition, InvalidArgument
from cast_core.tree import TokenTree
from cast_runtime.sessions import SessionStore
from draft_service.expansion import Budget, Expander, SequenceInput
from draft_service.levels import Cascade, Levels, LevelStep, merge_trees, parse_level
from cast_core.lookup import chain_values, lookup_chain


def test_lookup_continues_the_latest_occurrence_of_the_longest_suffix():
    seq = np.array([1, 2, 3, 9, 2, 3, 4, 5, 1, 2, 3])
    # "1 2 3" occurs at 0 (followed by 9); "2 3" more recently at 4, but the longer match wins.
    assert lookup_chain(seq, 3).tolist() == [9, 2, 3]
    assert lookup_chain(np.array([7, 8, 7, 8, 7]), 4).tolist() == [8, 7]  # stops at the end of the history
    assert lookup_chain(np.array([1, 2, 3]), 4).size == 0  # no earlier occurrence
    assert lookup_chain(np.array([4]), 4).size == 0
    assert lookup_chain(seq, 0).size == 0


def test_chain_values_never_grow_from_parent_to_child():
    values = chain_values(5, [0.9, 1.5, 0.5])  # a rate above 1 (a calibrated unit) counts as 1
    assert values.tolist() == pytest.approx([0.9, 0.9, 0.45, 0.225, 0.1125])
    assert (np.diff(values) <= 0).all()


def tree(tokens, parents, values) -> TokenTree:
    depths = [0]
    for p in parents[1:]:
        depths.append(depths[p] + 1)
    return TokenTree.from_lists(tokens, parents, depths, values)


def test_merged_trees_share_paths_and_keep_the_best_value():
    chain = tree([5, 7, 8, 9], [-1, 0, 1, 2], [1, 0.9, 0.8, 0.7])
    model = tree([5, 7, 3, 8, 4], [-1, 0, 0, 1, 1], [1, 0.95, 0.03, 0.5, 0.4])
    merged, levels = merge_trees([chain, model], [0, 1])
    merged.validate()
    paths = {}
    for i in range(len(merged)):
        paths[i] = (paths[int(merged.parents[i])] if i else ()) + ((int(merged.tokens[i]),) if i else ())
    by_path = {paths[i]: (float(merged.values[i]), int(levels[i])) for i in range(len(merged))}
    assert by_path[(7,)] == (pytest.approx(0.95), 0)  # both proposed it: the higher value, the first level
    assert by_path[(7, 8)] == (pytest.approx(0.8), 0)
    assert by_path[(7, 4)] == (pytest.approx(0.4), 1) and by_path[(3,)] == (pytest.approx(0.03), 1)
    assert len(merged) == 6  # root, 7, 7-8, 7-8-9, 3, 7-4
    assert (merged.values[1:] <= merged.values[merged.parents[1:]]).all()


def test_level_flags(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert parse_level("lookup").name == "lookup"
    spec = parse_level(f"sparse={tmp_path},layers=3")
    assert (spec.name, spec.path, spec.layers) == ("sparse", tmp_path, 3)
    for bad in ("medium=x", f"small={tmp_path / 'nope'}", f"small={tmp_path},layers=2", "lookup=x",
                f"sparse={tmp_path},depth=2"):
        with pytest.raises(ValueError, match="draft_level"):
            parse_level(bad)


def test_the_held_out_files_are_the_reference_trainings():
    from cast_models.train_reference import is_holdout as training_rule
    from draft_service.sparse import is_holdout

    names = [f"stdlib/module_{i}.py" for i in range(3000)]
    assert [is_holdout(n) for n in names] == [training_rule(0, n, 1.0) for n in names]
    assert 10 < sum(map(is_holdout, names)) < 60


def test_the_sparse_checkpoint_is_the_target_with_the_chosen_layers(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from draft_service.sparse import build_sparse_checkpoint, load_choice

    target_dir = tiny_pair[0]
    text = (target_dir / "tokenizer.json").read_text()[:20000]  # any held-out text
    (tmp_path / "text.txt").write_text(text)
    out = build_sparse_checkpoint(target_dir, 1, tmp_path / "text.txt", cache_dir=tmp_path)
    choice = load_choice(out)
    assert choice.target_layers == 2 and len(choice.layers) == 1 and 0 <= choice.agreement <= 1
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert build_sparse_checkpoint(target_dir, 1, tmp_path / "text.txt", cache_dir=tmp_path) == out  # cached
    full = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float64).eval()
    sparse = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    full.model.layers = torch.nn.ModuleList([full.model.layers[i] for i in choice.layers])
    full.config.num_hidden_layers = 1
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, full(ids).logits)


def test_a_level_that_sat_out_steps_catches_up(runner):
    """Sequence 'a' drafts with the model level every step, 'b' with lookup alone until the last step: both then
    get the same tree, which a fresh expander fed the whole history also gives."""
    def levels() -> Levels:
        model = Expander(runner, SessionStore(8, 60.0), runner.meta.max_context)
        return Levels({"small": model}, True, SessionStore(8, 60.0), runner.meta.vocab_size, 256)

    every, lazily = levels(), levels()
    budget = Budget(top_k=3, max_depth=2, max_breadth=2)
    lookup = Cascade((LevelStep("lookup", chain=3, acceptance=(0.8,)),))
    both = Cascade((LevelStep("lookup", chain=3, acceptance=(0.8,)), LevelStep("small", budget=budget)), 0)
    steps = [[5, 17, 99, 5, 17], [3], [8, 9], [5]]
    start = 0
    for i, new in enumerate(steps):
        seq = [SequenceInput("s", np.array(new), start)]
        [a], _ = every.expand(seq, both)
        [b], _ = lazily.expand(seq, both if i == len(steps) - 1 else lookup)
        start += len(new)
    assert a.tree.tokens.tolist() == b.tree.tokens.tolist()
    np.testing.assert_allclose(a.tree.values, b.tree.values, rtol=1e-5)
    fresh = Expander(runner, SessionStore(8, 60.0), runner.meta.max_context)
    [f], _ = fresh.expand([SequenceInput("s", np.array(sum(steps, [])), 0)], budget)
    merged, _ = merge_trees([TokenTree.root_only(5), f.tree], [0, 1])
    assert set(merged.tokens.tolist()) <= set(a.tree.tokens.tolist())
    with pytest.raises(FailedPrecondition, match="cascade.levels\\[0\\].level"):
        lazily.expand([SequenceInput("s", np.array([1]), start)], Cascade((LevelStep("sparse", budget=budget),)))
    assert len(lazily.sessions.get("s").tokens) == start  # a refused call changes nothing


def test_levels_serve_prepared_expands_and_rewinds(runner):
    """The service's path for pipelined steps: a prepared Expand (predict_root) roots its tree at the model's own
    next token and adds it to the history; a later Expand that starts before the history's end (the verifier took
    another branch) gets the tree a fresh expander gives for the real tokens. A cascade may not predict its root."""
    model = Expander(runner, SessionStore(8, 60.0), runner.meta.max_context)
    levels = Levels({"small": model}, True, SessionStore(8, 60.0), runner.meta.vocab_size, 256)
    budget = Budget(top_k=3, max_depth=3, max_breadth=3)
    prompt = [5, 17, 99, 5, 17, 3]
    levels.expand([SequenceInput("s", np.array(prompt), 0)], budget)
    [guess], _ = levels.expand([SequenceInput("s", np.array([3, 8]), len(prompt) - 1, predict_root=True)], budget)
    bonus = int(guess.tree.tokens[0])
    assert levels.sessions.get("s").tokens == [*prompt, 8, bonus]
    assert model.sessions.get("s").tokens == [*prompt, 8, bonus]
    with pytest.raises(InvalidArgument, match="predict_root"):
        levels.expand([SequenceInput("s", np.array([bonus]), len(prompt) + 1, predict_root=True)],
                      Cascade((LevelStep("small", budget=budget),)))
    real = [9, 4]  # the verifier accepted 9, not 8, then gave 4
    [after], _ = levels.expand([SequenceInput("s", np.array(real), len(prompt))], budget)
    assert levels.sessions.get("s").tokens == [*prompt, *real]
    [fresh], _ = Expander(runner, SessionStore(8, 60.0), runner.meta.max_context).expand(
        [SequenceInput("f", np.array([*prompt, *real]), 0)], budget)
    assert after.tree.tokens.tolist() == fresh.tree.tokens.tolist()
    np.testing.assert_allclose(after.tree.values, fresh.tree.values, rtol=1e-5)
    with pytest.raises(FailedPrecondition, match="past"):
        levels.expand([SequenceInput("s", np.array([1]), len(prompt) + 3)], budget)
