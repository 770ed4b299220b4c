"""Profiled forward costs, the paper's S(B) = {f(B, c, n)} tables (CAST, arXiv 2510.26577, Section 4).

f(B, c, n) is the wall time in milliseconds of one forward with batch B, context bucket c and n new tokens.
The verifier's table is S_T(B), the draft's S_D(B). Everything here is pure math on numpy arrays and the JSON text
format below; reading and writing files is cast_runtime's (`cast_runtime.profiling.save` / `load`).

Lookup rule (DESIGN.md): between grid points take the next bucket up, on every axis, and clamp at the largest
bucket. Rounding up prices a forward like the padded shape it will most likely run as (and never cheaper);
clamping under-prices shapes past the grid, so profile the grid as far as the services will go.

JSON file format (`to_json` / `from_json`), one object:

    {
      "format": "cast-cost-table/v1",
      "device": "NVIDIA H100 80GB HBM3",      # free text, as the service reports it
      "model_id": "my-target",                # free text
      "dtype": "bfloat16",
      "batch_sizes": [1, 2, 4, 8],            # strictly increasing positive ints
      "context_buckets": [256, 1024, 4096],   # strictly increasing positive ints
      "token_counts": [1, 2, 4, 8, 16, 32],   # strictly increasing positive ints
      "millis": [[[...N floats...], ...C rows...], ...B blocks...]   # [B][C][N], each > 0
    }

The proto `cast.v1.CostTable` carries the same fields with `millis` flattened row-major; converting is the
services' job, not this module's.
"""

from __future__ import annotations

import bisect
import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

JSON_FORMAT = "cast-cost-table/v1"


def _as_grid(values: Iterable[int], name: str) -> tuple[int, ...]:
    """Validate one axis of the grid: a non-empty, strictly increasing sequence of positive ints."""
    grid = tuple(int(v) for v in values)
    if not grid:
        raise ValueError(f"{name} is empty")
    if grid[0] < 1 or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"{name} must be strictly increasing positive ints, got {list(grid)}")
    return grid


def _bucket_index(grid: Sequence[int], value: int) -> int:
    """Index of the smallest bucket >= value (the next bucket up), clamped to the largest bucket."""
    # bisect, not np.searchsorted: this runs dozens of times a step, and numpy's call overhead was most of it.
    return min(bisect.bisect_left(grid, value), len(grid) - 1)


def _bucket_indices(grid: Sequence[int], values: np.ndarray) -> np.ndarray:
    """Vectorised `_bucket_index`."""
    return np.minimum(np.searchsorted(grid, values, side="left"), len(grid) - 1)


@functools.lru_cache(maxsize=256)
def _count_buckets(grid: tuple[int, ...], max_tokens: int) -> np.ndarray:
    """_bucket_indices(grid, 1..max_tokens), read-only: the columns costs_for_counts reads (each layer of each Expand
    asks for the same few)."""
    indices = _bucket_indices(grid, np.arange(1, max_tokens + 1))
    indices.setflags(write=False)
    return indices


def _frozen_array(values, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A read-only float64 copy of `values` with the given shape; every entry finite and > 0."""
    array = np.array(values, dtype=np.float64)
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"{name} must be finite and > 0 everywhere (costs are divided by)")
    array.setflags(write=False)  # the dataclass is frozen: so is its table
    return array


def monotone_envelope(millis: np.ndarray) -> np.ndarray:
    """The largest table below the measured one that never decreases along any axis (batch, context, tokens).

    A forward over more sequences, more context or more tokens does not cost less; a measurement that says so is
    noise that inflated its smaller neighbour. Each cell becomes the minimum over all cells at least as large on
    every axis (a reverse cumulative minimum per axis; each pass keeps the others' monotonicity).
    """
    out = np.asarray(millis, dtype=np.float64)
    for axis in range(out.ndim):
        flipped = np.flip(out, axis=axis)
        out = np.flip(np.minimum.accumulate(flipped, axis=axis), axis=axis)
    return out


@dataclass(frozen=True, eq=False)
class CostTable:
    """f(B, c, n) on a grid: S_T(B) for a verifier, S_D(B) for a draft."""

    device: str
    model_id: str
    dtype: str
    batch_sizes: tuple[int, ...]
    context_buckets: tuple[int, ...]
    token_counts: tuple[int, ...]
    millis: np.ndarray  # [len(batch_sizes)][len(context_buckets)][len(token_counts)] float64, read-only

    def __post_init__(self) -> None:
        # Normalise in place (frozen, hence object.__setattr__): lists in, tuples and a read-only array out.
        batch_sizes = _as_grid(self.batch_sizes, "batch_sizes")
        context_buckets = _as_grid(self.context_buckets, "context_buckets")
        token_counts = _as_grid(self.token_counts, "token_counts")
        shape = (len(batch_sizes), len(context_buckets), len(token_counts))
        object.__setattr__(self, "batch_sizes", batch_sizes)
        object.__setattr__(self, "context_buckets", context_buckets)
        object.__setattr__(self, "token_counts", token_counts)
        object.__setattr__(self, "millis", _frozen_array(self.millis, shape, "millis"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CostTable):
            return NotImplemented
        return (
            (self.device, self.model_id, self.dtype) == (other.device, other.model_id, other.dtype)
            and (self.batch_sizes, self.context_buckets, self.token_counts)
            == (other.batch_sizes, other.context_buckets, other.token_counts)
            and np.array_equal(self.millis, other.millis)
        )

    __hash__ = None  # type: ignore[assignment]  # equal by value, yet holds an array

    # ---- lookups ---------------------------------------------------------------------------------------------

    def cell(self, batch: int, context: int, tokens: int) -> tuple[int, int, int]:
        """Indices (b, c, n) of the grid cell that prices this forward: next bucket up on each axis, clamped."""
        return (
            _bucket_index(self.batch_sizes, batch),
            _bucket_index(self.context_buckets, context),
            _bucket_index(self.token_counts, tokens),
        )

    def lookup(self, batch: int, context: int, tokens: int) -> float:
        """f(B, c, n) in milliseconds (next bucket up, clamped at the largest)."""
        return float(self.millis[self.cell(batch, context, tokens)])

    def row(self, batch: int, context: int) -> np.ndarray:
        """[len(token_counts)] f(B, c, n) for every n of the grid (read-only view)."""
        b, c, _ = self.cell(batch, context, 1)
        return self.millis[b, c]

    def costs_for_counts(self, batch: int, context: int, max_tokens: int) -> np.ndarray:
        """[max_tokens] milliseconds: entry k-1 is f(B, c, k) for k = 1..max_tokens (a step function of k)."""
        return self.row(batch, context)[_count_buckets(self.token_counts, max_tokens)]

    def normalized_costs(self, batch: int, context: int, max_tokens: int) -> np.ndarray:
        """[max_tokens] reranking costs c_k = S_T(B)[ctx][k] / S_T(B)[ctx][1], k = 1..max_tokens (so c_1 = 1)."""
        return self.costs_for_counts(batch, context, max_tokens) / self.lookup(batch, context, 1)

    # ---- constructors and updates ----------------------------------------------------------------------------

    @staticmethod
    def linear(
        lam: float,
        delta: float,
        *,
        batch_sizes: Sequence[int] = (1,),
        context_buckets: Sequence[int] = (4096,),
        token_counts: Sequence[int] = tuple(range(1, 65)),
        device: str = "synthetic",
        model_id: str = "linear",
        dtype: str = "float32",
    ) -> CostTable:
        """A synthetic table with f(B, c, n) = lam * n + delta for every B and c (Theorem 4.1's cost model)."""
        n = np.asarray(_as_grid(token_counts, "token_counts"), dtype=np.float64)
        shape = (len(batch_sizes), len(context_buckets), n.shape[0])
        return CostTable(
            device, model_id, dtype, tuple(batch_sizes), tuple(context_buckets), tuple(token_counts),
            np.broadcast_to(lam * n + delta, shape),
        )

    # ---- JSON ------------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The documented JSON format (see the module docstring)."""
        return json.dumps(
            {
                "format": JSON_FORMAT,
                "device": self.device,
                "model_id": self.model_id,
                "dtype": self.dtype,
                "batch_sizes": list(self.batch_sizes),
                "context_buckets": list(self.context_buckets),
                "token_counts": list(self.token_counts),
                "millis": self.millis.tolist(),  # floats round-trip exactly through json
            },
            indent=1,
        )

    @staticmethod
    def from_json(text: str) -> CostTable:
        """Parse the documented JSON format; raises ValueError on a wrong format tag, missing field or bad grid."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != JSON_FORMAT:
            raise ValueError(f"not a {JSON_FORMAT} document")
        try:
            return CostTable(
                device=str(data["device"]),
                model_id=str(data["model_id"]),
                dtype=str(data["dtype"]),
                batch_sizes=data["batch_sizes"],
                context_buckets=data["context_buckets"],
                token_counts=data["token_counts"],
                millis=data["millis"],
            )
        except KeyError as missing:
            raise ValueError(f"cost table JSON lacks field {missing}") from None


@dataclass(frozen=True, eq=False)
class NormalizedCostSlice:
    """The draft's prices as CastBudget carries them: S_D(B)[node bucket][n] / S_T(B)[ctx][1].

    Row r is for `node_buckets[r]` nodes expanded so far, column j for `token_counts[j]` new tokens; lookups take
    the next bucket up on both axes and clamp, like CostTable. Dividing by the verifier's one-token forward puts
    draft cost in the same unit as the reranking cost c_k, so the thresholds C1/C2 compare like with like.
    """

    node_buckets: tuple[int, ...]
    token_counts: tuple[int, ...]
    normalized_cost: np.ndarray  # [len(node_buckets)][len(token_counts)] float64, read-only

    def __post_init__(self) -> None:
        node_buckets = _as_grid(self.node_buckets, "node_buckets")
        token_counts = _as_grid(self.token_counts, "token_counts")
        shape = (len(node_buckets), len(token_counts))
        object.__setattr__(self, "node_buckets", node_buckets)
        object.__setattr__(self, "token_counts", token_counts)
        object.__setattr__(self, "normalized_cost", _frozen_array(self.normalized_cost, shape, "normalized_cost"))

    def cost(self, nodes_so_far: int, tokens: int) -> float:
        """Normalised draft cost of a forward over `tokens` new tokens with `nodes_so_far` tree nodes."""
        r = _bucket_index(self.node_buckets, nodes_so_far)
        return float(self.normalized_cost[r, _bucket_index(self.token_counts, tokens)])

    def costs_for_counts(self, nodes_so_far: int, max_tokens: int) -> np.ndarray:
        """[max_tokens] breadth costs: entry k-1 is cost(nodes_so_far, k) for k = 1..max_tokens."""
        r = _bucket_index(self.node_buckets, nodes_so_far)
        return self.normalized_cost[r, _count_buckets(self.token_counts, max_tokens)]
