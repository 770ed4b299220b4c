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


def test_unknown_policy_names_the_field():
    assert resolve_policy("", "eagle2").name == "eagle2"
    with pytest.raises(InvalidArgument, match="policy"):
        resolve_policy("beam", "eagle2")
