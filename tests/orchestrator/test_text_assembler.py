from transformers import AutoTokenizer

from orchestrator.decoding import FinishReason, GenerationRequest, TextAssembler
from orchestrator.policies import POLICIES, resolve_policy

import pytest
from cast_core.errors import InvalidArgument


def make(tokenizer, **kw):
    request = GenerationRequest(prompt_ids=[1, 2], max_new_tokens=kw.pop("max_new_tokens", 100), policy=POLICIES["ar"], **kw)
    return TextAssembler(tokenizer, request.prompt_ids, request, tokenizer.eos_token_id)


def test_stop_string_cuts_text_and_holds_back_a_partial_match(tiny_pair):
    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    ids = tok.encode("return a + b\nprint(x)", add_special_tokens=False)
    asm = make(tok, stop=("\nprint",))
    streamed = ""
    reason = None
    for t in ids:
        _, reason = asm.add([t])
        streamed += asm.take_text(final=reason is not None)
        if reason:
            break
    assert reason is FinishReason.STOP
    assert streamed == "return a + b"


def test_eos_and_length(tiny_pair):
    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    asm = make(tok, max_new_tokens=3)
    taken, reason = asm.add([5, 6, 7, 8])
    assert (taken, reason) == ([5, 6, 7], FinishReason.LENGTH)
    asm = make(tok)
    taken, reason = asm.add([5, tok.eos_token_id, 9])
    assert (taken, reason) == ([5, tok.eos_token_id], FinishReason.EOS)
    assert asm.take_text(final=True) == tok.decode([5])


class CountingTokenizer:
    """The tiny pair's tokenizer, counting its decode calls."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decodes = tokenizer, 0
        self.eos_token_id = tokenizer.eos_token_id

    def decode(self, ids, **kw):
        self.decodes += 1
        return self.tokenizer.decode(ids, **kw)


def test_without_stop_strings_text_is_decoded_when_taken_not_per_step(tiny_pair):
    # The step loop calls add(); the request's reader calls take_text() while the loop waits for its next RPC.
    tok = CountingTokenizer(AutoTokenizer.from_pretrained(tiny_pair[0]))
    ids = tok.tokenizer.encode("def add(a, b):\n    return a + b", add_special_tokens=False)
    asm = make(tok)
    before = tok.decodes
    for t in ids[:4]:
        asm.add([t])
    assert tok.decodes == before  # four steps, no decoding yet
    streamed = asm.take_text(final=False)
    asm.add(ids[4:])
    streamed += asm.take_text(final=True)
    assert tok.decodes == before + 2
    assert streamed == tok.tokenizer.decode(ids)


def test_unknown_policy_names_the_field():
    assert resolve_policy("", "eagle2").name == "eagle2"
    with pytest.raises(InvalidArgument, match="policy"):
        resolve_policy("beam", "eagle2")
