"""Draft levels served side by side (CAS-Spec, arXiv 2510.26843): the draft service's domain when it drafts with
several drafters. `--draft-level NAME=SPEC`, repeatable:

    small=DIR               a separate draft model (ONNX Runtime), as a single-draft service runs it
    sparse=TARGET_DIR[,layers=N]
                            the target with some of its layers (sparse.py), exported to ONNX like a draft; a
                            checkpoint that sparse.py wrote (sparse.json in it) is served as it is
    lookup                  prompt lookup in the sequence's own tokens (lookup.py)

Per sequence the levels share one history of committed tokens: lookup searches it, and a model level that sat out
some steps commits what it missed at its next call (its own KV cache lives in its Expander, keyed by the same
sequence id). A start position before the history's end rewinds the history and every level's cache there (a
prepared branch the verifier did not take); a prepared Expand (`predict_root`, plain budgets only) adds the default
level's own next token, the tree's root, to the history. An Expand either names the default level's budget (the
first model level: small, else sparse), as a single-draft Expand does, or carries a cascade: its levels run in
order inside the one call and their trees are merged by token path, so that a step still pays one Expand per draft
replica.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cast_core.cost_table import CostTable
from cast_core.errors import CastError, FailedPrecondition, InvalidArgument
from cast_core.lookup import chain_values, lookup_chain
from cast_core.tree import TokenTree
from cast_runtime.sessions import SessionStore
from draft_service.expansion import Budget, Expander, Expansion, LayerStats, SequenceInput, check_sequences

KINDS = ("small", "sparse", "lookup")  # the default level is the first model level in this order
MAX_CHAIN = 64  # the longest lookup chain one Expand may ask for


@dataclass(frozen=True)
class LevelSpec:
    """One `--draft-level` flag: the level's name is its kind (one level of each kind at most)."""

    name: str
    path: Path | None = None  # small: the draft checkpoint; sparse: the target's
    layers: int = 0           # sparse: target layers kept (0: sparse.py's default)

    def __post_init__(self) -> None:
        if self.name not in KINDS:
            raise ValueError(f"draft_level: {self.name!r} is not one of {KINDS}")
        if self.name == "lookup" and self.path is not None:
            raise ValueError("draft_level: lookup takes no checkpoint")
        if self.name != "lookup" and (self.path is None or not (self.path / "config.json").is_file()):
            raise ValueError(f"draft_level: {self.name} needs a checkpoint directory (got {self.path})")
        if self.layers < 0 or (self.layers and self.name != "sparse"):
            raise ValueError(f"draft_level: layers={self.layers} is for sparse only, and must be >= 1")


def parse_level(text: str) -> LevelSpec:
    """NAME=SPEC as documented above, e.g. "sparse=models/reference/target,layers=4" or "lookup"."""
    name, _, spec = text.partition("=")
    parts = [p for p in spec.split(",") if p] if spec else []
    path = Path(parts[0]) if parts and "=" not in parts[0] else None
    options = dict(p.split("=", 1) for p in parts[1 if path else 0:] if "=" in p)
    unknown = set(options) - {"layers"}
    if unknown:
        raise ValueError(f"draft_level: unknown option(s) {sorted(unknown)} in {text!r}")
    try:
        layers = int(options.get("layers", 0))
    except ValueError:
        raise ValueError(f"draft_level: layers must be an integer in {text!r}") from None
    return LevelSpec(name.strip(), path, layers)


def lookup_cost_table(repeats: int = 20) -> CostTable:
    """The lookup level's f(B, c, n): B chain searches over c tokens, timed here (n does not matter)."""
    batches, contexts, counts = (1, 2, 4, 8, 16, 32), (128, 512, 2048), (1, 64)
    rng = np.random.default_rng(0)
    per_search = []
    for c in contexts:
        tokens = rng.integers(0, 512, size=c)
        start = time.perf_counter()
        for _ in range(repeats):
            lookup_chain(tokens, 8)
        per_search.append((time.perf_counter() - start) / repeats * 1e3)
    millis = np.array([[[b * ms] * len(counts) for ms in per_search] for b in batches])
    return CostTable("cpu", "lookup", "int64", batches, contexts, counts, millis)


# --- a cascaded Expand --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LevelStep:
    level: str
    budget: Budget | None = None          # model levels
    chain: int = 0                        # lookup: the longest chain
    acceptance: tuple[float, ...] = ()    # lookup: per depth, the chance its token is accepted given its parent


@dataclass(frozen=True)
class Cascade:
    steps: tuple[LevelStep, ...]
    max_returned_nodes: int = 0


def cascade_from_proto(cascade, budget_from_proto) -> Cascade:
    """A CascadeBudget message as a Cascade; budget_from_proto: the servicer's ExpandBudget parser."""
    steps, seen = [], set()
    for i, level in enumerate(cascade.levels):
        f = f"cascade.levels[{i}]"
        if level.level not in KINDS:
            raise InvalidArgument(f"{level.level!r} is not one of {KINDS}", f"{f}.level")
        if level.level in seen:
            raise InvalidArgument(f"{level.level!r} appears twice", f"{f}.level")
        seen.add(level.level)
        if level.level == "lookup":
            if not 0 <= level.budget.max_depth <= MAX_CHAIN:
                raise InvalidArgument(f"{level.budget.max_depth} is outside [0, {MAX_CHAIN}]",
                                      f"{f}.budget.max_depth")
            if not level.acceptance or not all(math.isfinite(a) and a >= 0 for a in level.acceptance):
                raise InvalidArgument("must be one or more finite numbers >= 0", f"{f}.acceptance")
            steps.append(LevelStep("lookup", chain=level.budget.max_depth, acceptance=tuple(level.acceptance)))
        else:
            try:
                steps.append(LevelStep(level.level, budget=budget_from_proto(level.budget)))
            except InvalidArgument as e:  # name the level too
                raise InvalidArgument(str(e), f) from None
    if cascade.max_returned_nodes < 0:
        raise InvalidArgument(f"{cascade.max_returned_nodes} must be >= 0 (0: every node)",
                              "cascade.max_returned_nodes")
    return Cascade(tuple(steps), cascade.max_returned_nodes)


def merge_trees(trees: list[TokenTree], levels: list[int]) -> tuple[TokenTree, np.ndarray]:
    """One tree from several with the same root, merged by token path: a node proposed by several keeps the
    highest value (still never above its parent's) and the first one's level. Returns the tree and [N] levels
    (root: -1)."""
    tokens, parents, depths, values, origin = [int(trees[0].tokens[0])], [-1], [0], [1.0], [-1]
    index: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    for tree, level in zip(trees, levels):
        where = np.zeros(len(tree), dtype=np.int64)  # this tree's node -> merged node
        for i in range(1, len(tree)):
            key = (int(where[tree.parents[i]]), int(tree.tokens[i]))
            j = index.get(key)
            if j is None:
                j = index[key] = len(tokens)
                tokens.append(key[1])
                parents.append(key[0])
                depths.append(int(tree.depths[i]))
                values.append(float(tree.values[i]))
                origin.append(level)
            else:
                values[j] = max(values[j], float(tree.values[i]))
            where[i] = j
    merged = TokenTree(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64),
                       np.array(depths, dtype=np.int64), np.array(values, dtype=np.float32))
    return merged, np.array(origin, dtype=np.int64)


def chain_tree(root: int, chain: np.ndarray, values: np.ndarray) -> TokenTree:
    n = chain.shape[0]
    return TokenTree(np.concatenate([[root], chain]).astype(np.int64), np.arange(-1, n, dtype=np.int64),
                     np.arange(n + 1, dtype=np.int64), np.concatenate([[1.0], values]).astype(np.float32))


@dataclass
class CascadeExpansion(Expansion):
    node_levels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [N], index in steps


# --- the levels ---------------------------------------------------------------------------------------------


@dataclass
class History:
    tokens: list[int] = field(default_factory=list)


class Levels:
    """The levels of one draft service and each sequence's history; called from one thread, as an Expander is."""

    def __init__(self, models: dict[str, Expander], lookup: bool, sessions: SessionStore[History],
                 vocab_size: int, max_context: int) -> None:
        if not models and not lookup:
            raise ValueError("a draft service needs at least one level")
        self.models = models
        self.lookup = lookup
        self.sessions = sessions
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.default = next((k for k in KINDS if k in models), None)  # the level a plain Expand uses

    @property
    def names(self) -> list[str]:
        return [k for k in KINDS if k in self.models or (k == "lookup" and self.lookup)]

    @property
    def cold_runs(self) -> int:
        return sum(m.cold_runs for m in self.models.values())

    def release(self, sequence_ids: list[str]) -> int:
        for model in self.models.values():
            model.release(sequence_ids)
        return self.sessions.release(sequence_ids)

    def expire(self) -> list[str]:
        for model in self.models.values():
            model.expire()
        return self.sessions.expire()

    def expand(self, sequences: list[SequenceInput], budget: Budget | Cascade) -> tuple[list[Expansion], float]:
        """A plain Expand (a Budget: the default level) or a cascaded one; validated whole before anything
        changes. Returns the expansions and the model time (s)."""
        if isinstance(budget, Cascade):
            for i, q in enumerate(sequences):
                if q.predict_root:
                    raise InvalidArgument("a prepared Expand takes a plain budget, not a cascade",
                                          f"sequences[{i}].predict_root")
            for i, step in enumerate(budget.steps):
                if step.level not in self.names:
                    raise FailedPrecondition(f"this replica serves {self.names}, not {step.level!r}",
                                             f"cascade.levels[{i}].level")
                if step.budget is not None:
                    try:
                        self.models[step.level].validate_budget(step.budget)
                    except CastError as e:  # name the level too
                        raise type(e)(str(e), f"cascade.levels[{i}]") from None
        elif self.default is None:
            raise FailedPrecondition(f"this replica serves only {self.names}: send a cascade", "budget")
        else:
            self.models[self.default].validate_budget(budget)
        histories = self.commit(sequences)
        if not isinstance(budget, Cascade):
            return self.expand_level(self.default, sequences, histories, budget)
        return self.expand_cascade(sequences, histories, budget)

    def commit(self, sequences: list[SequenceInput]) -> list[History]:
        """Validate the sequences against their histories, then append their new tokens."""
        found = check_sequences(sequences, self.vocab_size, self.max_context, self.sessions,
                                lambda history: len(history.tokens))
        fresh = [q.sequence_id for q, h in zip(sequences, found) if h is None]
        for model in self.models.values():  # a level's cache of an expired history is stale
            model.release(fresh)
        histories = [h if h is not None else self.sessions.create(q.sequence_id, History())
                     for q, h in zip(sequences, found)]
        for q, h in zip(sequences, histories):
            if q.start_position < len(h.tokens):  # a rewind: the history and every level's cache past it
                del h.tokens[q.start_position:]
                for model in self.models.values():
                    if q.sequence_id in model.sessions and model.sessions.get(q.sequence_id).length > q.start_position:
                        model.rewind(q.sequence_id, q.start_position)
            h.tokens.extend(q.new_tokens.tolist())
        return histories

    def expand_level(self, name: str, sequences, histories, budget: Budget) -> tuple[list[Expansion], float]:
        """One model level's expansion: it first commits whatever of each history it has not seen."""
        model = self.models[name]
        inputs = []
        for q, h in zip(sequences, histories):
            seen = model.sessions.get(q.sequence_id).length if q.sequence_id in model.sessions else 0
            inputs.append(SequenceInput(q.sequence_id, np.asarray(h.tokens[seen:], dtype=np.int64), seen,
                                        q.predict_root))
        out, seconds = model.expand(inputs, budget)
        for q, h, e in zip(sequences, histories, out):
            if q.predict_root:  # the model committed its own next token: the tree's root
                h.tokens.append(int(e.tree.tokens[0]))
        return out, seconds

    def expand_cascade(self, sequences, histories, cascade: Cascade) -> tuple[list[Expansion], float]:
        trees: list[list[TokenTree]] = [[] for _ in sequences]
        first_model: list[Expansion] | None = None
        expanded = [1] * len(sequences)
        seconds = 0.0
        for step in cascade.steps:
            if step.level == "lookup":
                for b, h in enumerate(histories):
                    room = self.max_context - len(h.tokens)  # positions left after the root
                    chain = lookup_chain(np.asarray(h.tokens, dtype=np.int64), min(step.chain, room))
                    trees[b].append(chain_tree(h.tokens[-1], chain, chain_values(chain.shape[0], step.acceptance)))
                    expanded[b] += chain.shape[0]
                continue
            out, model_seconds = self.expand_level(step.level, sequences, histories, step.budget)
            seconds += model_seconds
            first_model = first_model or out
            for b, e in enumerate(out):
                trees[b].append(e.tree)
                expanded[b] += e.expanded_nodes - 1
        result = []
        for b, q in enumerate(sequences):
            if trees[b]:  # every step added one tree per sequence: tree i is step i's
                tree, origin = merge_trees(trees[b], list(range(len(trees[b]))))
            else:
                tree, origin = TokenTree.root_only(histories[b].tokens[-1]), np.array([-1])
            if cascade.max_returned_nodes > 0 and len(tree) > cascade.max_returned_nodes:
                keep = tree.top_m_indices(cascade.max_returned_nodes)
                tree, origin = tree.subtree(keep), origin[keep]
            layers: list[LayerStats] = first_model[b].layers if first_model else []
            utilities = first_model[b].layer_utilities if first_model else []
            result.append(CascadeExpansion(q.sequence_id, tree, layers, utilities, expanded[b], origin))
        return result, seconds
