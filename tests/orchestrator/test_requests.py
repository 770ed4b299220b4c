"""The one request check of both APIs: errors name the field as the caller's API spells it, and an HTTP request
without a token limit gets what the context leaves."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from cast_core.errors import InvalidArgument, OutOfRange
from orchestrator.policies import POLICIES
from orchestrator.requests import RequestBuilder


@pytest.fixture(scope="module")
def builder(tiny_pair):
    return RequestBuilder(AutoTokenizer.from_pretrained(tiny_pair[0]), max_context=64, max_new_tokens_limit=40,
                          default_policy="cast", policies=POLICIES)


def test_no_token_limit_means_what_the_context_and_the_server_allow(builder):
    short = builder.build("def f(x):", None)
    assert short.max_new_tokens == 40  # the server's limit
    long_prompt = "x = 1\n" * 8
    room = 64 - len(builder.tokenizer.encode(long_prompt, add_special_tokens=False))
    assert 0 < room < 40 and builder.build(long_prompt, None).max_new_tokens == room


@pytest.mark.parametrize("fields, error, field", [
    (dict(max_new_tokens=0), InvalidArgument, "max_tokens"),
    (dict(max_new_tokens=41), OutOfRange, "max_tokens"),
    (dict(policy="beam"), InvalidArgument, "cast.policy"),
    (dict(policy="tree:4x5/200"), InvalidArgument, "cast.policy"),
    (dict(prompt="x = 1\n" * 40), OutOfRange, "messages"),
    (dict(prompt=[5, 10**6]), InvalidArgument, "messages[1]"),
    (dict(temperature=float("nan")), InvalidArgument, "temperature"),
    (dict(seed=2**64), InvalidArgument, "seed"),
])
def test_errors_name_the_field_in_the_callers_spelling(builder, fields, error, field):
    names = {"max_new_tokens": "max_tokens", "policy": "cast.policy", "prompt": "messages"}
    with pytest.raises(error) as info:
        builder.build(**{"prompt": "def f(x):", "max_new_tokens": 8, **fields}, names=names)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")


def test_token_ids_pass_as_they_are_and_seeds_are_drawn_when_absent(builder):
    request = builder.build([5, 6, 7], 4, temperature=0.7)
    assert request.prompt_ids == [5, 6, 7] and request.seed is not None
    assert builder.build([5, 6, 7], 4, seed=9).seed == 9


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(builder, monkeypatch):
    def no_encode(*args, **kwargs):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(builder.tokenizer, "encode", no_encode)
    with pytest.raises(OutOfRange, match="characters cannot fit") as info:
        builder.build("x" * (32 * 64 + 1), 4)
    assert info.value.field == "prompt"


@pytest.mark.parametrize("stop", [["x"] * 17, ["x" * 257]])
def test_stop_strings_are_limited_in_count_and_length(builder, stop):
    with pytest.raises(InvalidArgument) as info:
        builder.build("def f(x):", 4, stop=stop)
    assert info.value.field == "stop"
