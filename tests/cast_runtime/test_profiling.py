from pathlib import Path

import numpy as np

from cast_core.cost_table import CostTable
from cast_runtime.cache import default_cache_dir
from cast_runtime.profiling import cache_path, load, load_cached, save, save_atomic


def _table() -> CostTable:
    millis = np.arange(1.0, 7.0).reshape(1, 2, 3)
    millis[0, 0, 0] = 1.0 / 3.0  # a float without a short decimal form
    return CostTable("cpu", "target@cfg:abc", "float32", [1], [128, 512], [1, 2, 4], millis)


def test_a_saved_table_loads_equal(tmp_path):
    table = _table()
    save(table, tmp_path / "verify-cost.json")
    assert load(tmp_path / "verify-cost.json") == table
    save_atomic(table, tmp_path / "new" / "t.json")  # makes the folder, leaves no temporary file
    assert load_cached(tmp_path / "new" / "t.json") == table and len(list((tmp_path / "new").iterdir())) == 1
    (tmp_path / "bad.json").write_text("{}")
    assert load_cached(tmp_path / "bad.json") is None and load_cached(tmp_path / "missing.json") is None


def test_the_cache_directory_is_cast_cache_dir_else_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CAST_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    path = cache_path("verify", "cpu", "target@cfg:abc", "float32")
    assert path.parent == tmp_path / "cost-tables" and path.name.startswith("verify-target-")
    assert cache_path("verify", "cpu", "target@cfg:abc", "float32", cache_dir=tmp_path / "x").parent == \
        tmp_path / "x" / "cost-tables"
    monkeypatch.setenv("CAST_CACHE_DIR", "")  # set but empty counts as unset
    assert default_cache_dir() == Path.home() / ".cache" / "cast-serve"
