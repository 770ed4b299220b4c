"""One request check for both public APIs (gRPC and HTTP): field values in, a GenerationRequest out, or an
InvalidArgument / OutOfRange naming the field at fault in the caller's own spelling (`names`)."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cast_core.errors import InvalidArgument, OutOfRange
from orchestrator.decoding import GenerationRequest
from orchestrator.policies import TreePolicy, resolve_policy

MAX_STOP_STRINGS = 16   # stop strings per request at most (each is matched against the text at every step)
MAX_STOP_CHARS = 256    # characters per stop string at most
MAX_CHARS_PER_TOKEN = 32  # a prompt longer than this many characters per token of the context is refused untokenized


@dataclass(frozen=True)
class RequestBuilder:
    tokenizer: object
    max_context: int                 # the smaller of the draft's and the verifier's
    max_new_tokens_limit: int        # larger requests are OUT_OF_RANGE
    default_policy: str
    policies: dict[str, TreePolicy]

    def build(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int | None,
        *,
        policy: str = "",
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        ignore_eos: bool = False,
        names: Mapping[str, str] | None = None,
    ) -> GenerationRequest:
        """Check every field and tokenize the prompt (text, or token ids as they are). max_new_tokens None: as many
        as the context and this server's limit allow. `names` maps a field's name here to the API's (the HTTP API
        calls max_new_tokens `max_tokens`)."""
        names = names or {}

        def name(field: str) -> str:
            return names.get(field, field)

        if max_new_tokens is not None:
            if max_new_tokens <= 0:
                raise InvalidArgument(f"must be positive, got {max_new_tokens}", name("max_new_tokens"))
            if max_new_tokens > self.max_new_tokens_limit:
                raise OutOfRange(f"{max_new_tokens} is above this server's limit of {self.max_new_tokens_limit}",
                                 name("max_new_tokens"))
        tree_policy = resolve_policy(policy, self.default_policy, self.policies, name("policy"))
        if any(not s for s in stop):
            raise InvalidArgument("stop strings must not be empty", name("stop"))
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"{len(stop)} stop strings; at most {MAX_STOP_STRINGS}", name("stop"))
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise InvalidArgument(f"a stop string has more than {MAX_STOP_CHARS} characters", name("stop"))
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument(f"must be >= 0, got {temperature}", name("temperature"))
        if not 0 < top_p <= 1:
            raise InvalidArgument(f"must be in (0, 1], got {top_p}", name("top_p"))
        if top_k < 0:
            raise InvalidArgument(f"must be >= 0, got {top_k}", name("top_k"))
        if seed is not None and not 0 <= seed < 2**64:
            raise InvalidArgument(f"must be in [0, 2^64), got {seed}", name("seed"))
        prompt_ids = self.prompt_ids(prompt, name("prompt"))
        limit = self.max_context - 1
        if len(prompt_ids) > limit:
            raise OutOfRange(f"{len(prompt_ids)} tokens; the model's context leaves room for {limit}", name("prompt"))
        if max_new_tokens is None:
            max_new_tokens = min(self.max_new_tokens_limit, self.max_context - len(prompt_ids))
        return GenerationRequest(
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            policy=tree_policy,
            stop=tuple(stop),
            ignore_eos=ignore_eos,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            # Unseeded sampling still runs on a seed, drawn here, so that every step of the request uses one stream.
            seed=seed if seed is not None else secrets.randbits(63),
        )

    def prompt_ids(self, prompt: str | Sequence[int], field: str) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgument("must not be empty", field)
            if len(prompt) > MAX_CHARS_PER_TOKEN * self.max_context:  # cannot fit: spare the tokenizer the work
                raise OutOfRange(f"{len(prompt)} characters cannot fit the model's context of {self.max_context} "
                                 "tokens", field)
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            if not ids:
                raise InvalidArgument("encodes to no tokens", field)
            return ids
        if not prompt:
            raise InvalidArgument("must not be empty", field)
        vocab = len(self.tokenizer)
        for i, token in enumerate(prompt):
            if not 0 <= token < vocab:
                raise InvalidArgument(f"token {token} is outside the vocabulary [0, {vocab})", f"{field}[{i}]")
        return list(prompt)
