"""Shared by both services' profilers (verify_service/profile.py, draft_service/profile.py): the grid to measure,
the timing loop, cost-table files and the on-disk cache of profiled tables.

A cost table belongs to (device, model identity, dtype, backend details): the cache file name is a hash of those,
under $CAST_CACHE_DIR/cost-tables/. `cast profile verify|draft` writes to the same path by default, so a table
profiled offline with the full grid is what a service finds at start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from cast_core.cost_table import CostTable
from cast_runtime.cache import default_cache_dir

COST_TABLE_DIR = "cost-tables"
# Part of a cached table's key: tables cached before the services started up one at a time (cache.startup_lock) may
# be priced for a neighbour's start-up, so they are not read again.
TABLE_GENERATION = 2


def parse_ints(text: str | Iterable[int]) -> tuple[int, ...]:
    """"1,2,4" (or a sequence of ints) -> (1, 2, 4), sorted and deduplicated."""
    values = [int(v) for v in text.split(",") if v.strip()] if isinstance(text, str) else [int(v) for v in text]
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class ProfileGrid:
    batch_sizes: tuple[int, ...]
    context_buckets: tuple[int, ...]
    token_counts: tuple[int, ...]
    repeats: int = 5  # timed forwards per cell: the cell is the fastest of them
    warmup: int = 2  # untimed forwards per cell first (allocator, kernel selection, ORT arenas)

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "context_buckets", "token_counts"):
            values = parse_ints(getattr(self, name))
            if not values or values[0] < 1:
                raise ValueError(f"{name}: need positive ints, got {list(values)}")
            object.__setattr__(self, name, values)
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")

    @property
    def cells(self) -> int:
        return len(self.batch_sizes) * len(self.context_buckets) * len(self.token_counts)

    @property
    def forwards(self) -> int:
        return self.cells * (self.repeats + self.warmup)

    def capped(self, max_context: int) -> ProfileGrid:
        """Context buckets past the model's limit become its last position (so long contexts are still priced)."""
        if max_context <= 1:
            return self
        contexts = parse_ints(min(c, max_context - 1) for c in self.context_buckets)
        return replace(self, context_buckets=contexts)

    def with_timing(self, repeats: int | None, warmup: int | None) -> ProfileGrid:
        return replace(
            self,
            repeats=self.repeats if repeats is None else repeats,
            warmup=self.warmup if warmup is None else warmup,
        )


@dataclass(frozen=True)
class Profile:
    table: CostTable
    seconds: float  # wall time of the whole profile, set-up (prefills, KV copies) included
    forwards: int  # forwards run, warm-up included


def batch_sizes_up_to(limit: int) -> tuple[int, ...]:
    """Powers of two below `limit`, then `limit`: a table's batch axis reaching the largest batch a service runs
    (past its last bucket a lookup clamps, and prices a step at batch 32 as one at batch 8: reports/cast-vs-fixed/)."""
    sizes = [1 << i for i in range(max(limit - 1, 0).bit_length()) if 1 << i < limit]
    return (*sizes, limit)


def fastest_millis(forward: Callable[[], object], repeats: int, warmup: int, sync: Callable[[], None]) -> float:
    """Fastest wall time of `forward` in ms over `repeats` runs after `warmup` untimed ones.

    The fastest, not the median: on a shared machine other processes only ever add time, and a table inflated by
    a burst of load would mislead CAST for as long as it is cached (the median of 2-5 runs is not enough).
    `sync` waits for the device (torch.cuda.synchronize on CUDA): without it an asynchronous launch is all a
    timer would see.
    """
    for _ in range(warmup):
        forward()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        forward()
        sync()
        best = min(best, (time.perf_counter() - start) * 1e3)
    return best


def no_sync() -> None:
    pass


# ---- files, identity and cache ---------------------------------------------------------------------------------


def save(table: CostTable, path: str | Path) -> None:
    """Write `table` to `path` in cast_core's JSON format."""
    Path(path).write_text(table.to_json() + "\n", encoding="utf-8")


def load(path: str | Path) -> CostTable:
    """Read a table written by `save` (or by hand, in the documented JSON format)."""
    return CostTable.from_json(Path(path).read_text(encoding="utf-8"))


def config_hash(model_dir: str | Path) -> str:
    """Hash of the checkpoint's config.json: the architecture fixes the cost, the weights don't."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def model_identity(model_name: str, model_dir: str | Path) -> str:
    """The `model_id` of a profiled table: name and config hash, e.g. "target@cfg:1a2b3c4d5e6f"."""
    return f"{model_name}@cfg:{config_hash(model_dir)}"


def host_key(device: str) -> str:
    """What, besides its name, a device's timings depend on. A CPU's name is just "cpu": add its model and cores."""
    if device != "cpu":
        return device
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu/{model}/{os.cpu_count()}"


def cache_path(
    role: str, device: str, model_id: str, dtype: str, extra: str = "", cache_dir: str | Path | None = None
) -> Path:
    """$CAST_CACHE_DIR/cost-tables/<role>-<model name>-<hash of device, model, dtype, extra>.json."""
    key = json.dumps([role, host_key(device), model_id, dtype, extra, TABLE_GENERATION])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id.split("@")[0])[:40] or "model"
    return Path(cache_dir or default_cache_dir()) / COST_TABLE_DIR / f"{role}-{name}-{digest}.json"


def load_cached(path: Path) -> CostTable | None:
    """The table at `path`, or None when there is none or it does not parse (then it is profiled again)."""
    try:
        return load(path)
    except (OSError, ValueError):
        return None


def save_atomic(table: CostTable, path: Path) -> None:
    """Write through a private file and rename: a concurrent reader never sees half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save(table, tmp)
    os.replace(tmp, path)


def describe_grid(grid: ProfileGrid) -> str:
    return (
        f"B {list(grid.batch_sizes)}, c {list(grid.context_buckets)}, n {list(grid.token_counts)}, "
        f"{grid.cells} cells x ({grid.warmup} warm-up + {grid.repeats} timed)"
    )


def select_startup_table(
    path_given: Path | None,
    profile_enabled: bool,
    cached: Path,
    run_profile: Callable[[], Profile],
    device: str,
    model_id: str,
    log,
) -> CostTable | None:
    """A service's table at start-up: the file it was given; else the cached one; else profile and cache; or none.

    A given table whose device or model differs from this replica's is still used (the operator chose it), with a
    warning.
    """
    if path_given is not None:
        table = load(path_given)  # a bad file given on purpose fails the start
        log.info("cost table from %s (%s, %s)", path_given, table.device, table.model_id)
        if (table.device, table.model_id) != (device, model_id):
            log.warning("cost table %s was profiled for %s on %s; this replica is %s on %s",
                        path_given, table.model_id, table.device, model_id, device)
        return table
    if not profile_enabled:
        log.info("no cost table (profiling off): the orchestrator uses its prior")
        return None
    table = load_cached(cached)
    if table is not None:
        log.info("cost table from cache %s", cached)
        return table
    profile = run_profile()
    try:
        save_atomic(profile.table, cached)
    except OSError as exc:  # a read-only cache still serves, it just profiles again next time
        log.warning("could not cache the cost table at %s: %s", cached, exc)
    log.info("profiled the cost table in %.1f s (%d forwards); cached at %s", profile.seconds, profile.forwards, cached)
    return profile.table
