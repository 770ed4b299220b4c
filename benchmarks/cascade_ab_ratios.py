"""Per-round ratios of an A/B by benchmarks/cascade_cpu_ab.sh, batch 1: `cascade` / `ar`, `cascade` / the best single
level, and the target-only stack's `cascade` / `ar`, per prompt set and code (base, new).

    python benchmarks/cascade_ab_ratios.py OUT        # OUT/1-base/runs.csv ... or OUT/1-base.csv ...
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

LEVELS = ("lookup", "small", "sparse")


def runs(out: Path) -> list[tuple[str, Path]]:
    """(code, runs.csv) of each run, in order: N-who/runs.csv, or N-who.csv as the reports keep them."""
    found = sorted(out.glob("*-*/runs.csv")) or sorted(out.glob("*-*.csv"))
    named = [(path.parent.name if path.name == "runs.csv" else path.stem, path) for path in found]
    return [(name.split("-", 1)[1], path) for name, path in named]


def ratios(out: Path) -> dict[tuple[str, str, str], list[float]]:
    res: dict[tuple[str, str, str], list[float]] = defaultdict(list)  # (set, ratio, code) -> per round
    for who, path in runs(out):
        rows = [r for r in csv.DictReader(path.open()) if r["batch"] == "1"]
        for key in sorted({(r["round"], r["set"]) for r in rows}):
            tps = {(r["stack"], r["policy"]): float(r["tokens_per_s"]) for r in rows if (r["round"], r["set"]) == key}
            cascade, name = tps[("pair", "cascade")], key[1]
            res[name, "cascade/ar", who].append(cascade / tps[("pair", "ar")])
            res[name, "cascade/best", who].append(cascade / max(tps.get(("pair", p), 0.0) for p in LEVELS))
            if ("target-only", "cascade") in tps:
                res[name, "no small/ar", who].append(tps[("target-only", "cascade")] / tps[("pair", "ar")])
    return res


if __name__ == "__main__":
    for (name, ratio, who), values in sorted(ratios(Path(sys.argv[1])).items()):
        print(f"{name:10s} {ratio:13s} {who:5s} mean {statistics.mean(values):.3f}  "
              + " ".join(f"{v:.2f}" for v in values))
