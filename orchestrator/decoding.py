"""One request's side of decoding: what was asked, what it has produced, its stop conditions and its stats.

The step loop (step_loop.py) advances many of these together, one batched step at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from cast_core.tree import TokenTree
from orchestrator.policies import TreePolicy


class FinishReason(Enum):
    LENGTH = 1
    EOS = 2
    STOP = 3
    CONTEXT = 4


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    policy: TreePolicy
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class StepRecord:
    expanded_nodes: int
    verified_nodes: int
    depth: int
    accepted_tokens: int
    timing: StepTiming | None = None  # shared by every sequence of the batched step
    pipeline: str = "none"  # hit / miss: the tree prepared during the last Verify was used / was not; none: none was
    arm: str = "plain"      # the kind of step its policy ran, and a cascade's mode (StepStats in generation.proto)
    mode: str = ""


@dataclass
class StepTiming:
    """Seconds of one step (see StepStats in generation.proto)."""

    step: float = 0.0
    draft_rpc: float = 0.0
    draft_model: float = 0.0
    verify_rpc: float = 0.0
    verify_model: float = 0.0
    # The cost model's prediction for the step, made before it ran (milliseconds; 0: none, e.g. no Expand).
    predicted_draft_ms: float = 0.0   # the slowest of its parallel Expands, RPC included
    predicted_verify_ms: float = 0.0  # its Verify, for the batch's largest tree
    # One-time costs the step paid (`one_off`): newcomers' prefill on the verifier, a CUDA graph capture (a
    # replica's `cold` flag), the draft catching up on a prompt or the tokens of plain steps before drafting.
    prefill: bool = False
    cold: bool = False
    switched: bool = False

    @property
    def one_off(self) -> bool:
        """Its times are not what a step costs: nothing that learns from step times learns from it."""
        return self.prefill or self.cold or self.switched

    @property
    def only_switched(self) -> bool:
        """Its one-time cost was the draft catching up alone: what switching to drafting costs (the gate charges
        it to its probes of drafting)."""
        return self.switched and not (self.prefill or self.cold)


@dataclass
class GenerationStats:
    policy: str
    steps: list[StepRecord] = field(default_factory=list)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0
    replays: int = 0  # times it was replayed on another verify replica (its own failed or drained)

    @property
    def mean_accepted_length(self) -> float:
        return sum(s.accepted_tokens for s in self.steps) / len(self.steps) if self.steps else 0.0


@dataclass
class Chunk:
    """What one step adds to the output; the last chunk has finish_reason and stats set."""

    text: str | None  # None until the request's reader takes it from the assembler
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None
    completion_tokens: int = 0
    step: StepRecord | None = None  # the step that committed token_ids (None: a chunk no step made)
    tree: TokenTree | None = None   # ... and the tree it verified: token_ids walk down it, then the bonus token


class TextAssembler:
    """Incremental detokenisation with stop strings, EOS and the token limit, one committed token at a time."""

    def __init__(self, tokenizer, prompt_ids: list[int], request: GenerationRequest, eos_token_id: int | None) -> None:
        self.tokenizer = tokenizer
        # Decode with a little prompt context so that tokenizers that drop a leading space stay exact.
        self.context_ids = prompt_ids[-4:]
        self.context_text = tokenizer.decode(self.context_ids, skip_special_tokens=True)
        self.request = request
        self.eos = None if request.ignore_eos else eos_token_id
        self.token_ids: list[int] = []
        self._text = ""
        self._decoded = 0  # how many of token_ids _text holds: without stop strings, decoding waits for take_text
        self.emitted = 0
        self.holdback = max((len(s) for s in request.stop), default=1) - 1

    @property
    def text(self) -> str:
        """The output's text so far (a stop string cut off)."""
        if self._decoded < len(self.token_ids):
            full = self.tokenizer.decode(self.context_ids + self.token_ids, skip_special_tokens=True)
            self._text, self._decoded = full[len(self.context_text):], len(self.token_ids)
        return self._text

    def add(self, tokens: list[int]) -> tuple[list[int], FinishReason | None]:
        """Append committed tokens until one finishes the request; return those taken and the reason."""
        taken: list[int] = []
        reason = None
        for token in tokens:
            self.token_ids.append(token)
            taken.append(token)
            if self.request.stop:  # only stop strings need the text now; else the reader decodes (take_text)
                text = self.text
                cut = min((i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.request.stop) if i >= 0), default=-1)
                if cut >= 0:
                    self._text = text[:cut]
                    reason = FinishReason.STOP
                    break
            if token == self.eos:
                reason = FinishReason.EOS
                break
            if len(self.token_ids) >= self.request.max_new_tokens:
                reason = FinishReason.LENGTH
                break
        return taken, reason

    def take_text(self, final: bool) -> str:
        """New text since the last call; holds back what could still become a stop string or a split character."""
        text = self.text
        end = len(text)
        if not final:
            end -= self.holdback
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.emitted:
            return ""
        out = text[self.emitted:end]
        self.emitted = end
        return out
