"""Cost tables: next-bucket-up lookups, clamping, JSON round trip, normalised draft slices, online updates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cast_core.cost_table import CostTable, NormalizedCostSlice, monotone_envelope


def _table() -> CostTable:
    # f(B, c, n) = 100*b_index + 10*c_index + n_index + 1: every cell distinct, easy to read back
    b, c, n = np.meshgrid(np.arange(2), np.arange(3), np.arange(4), indexing="ij")
    return CostTable(
        device="test-gpu",
        model_id="tiny",
        dtype="float16",
        batch_sizes=[1, 4],
        context_buckets=[128, 512, 2048],
        token_counts=[1, 2, 4, 8],
        millis=100.0 * b + 10.0 * c + n + 1,
    )


def test_lookup_on_grid_points():
    table = _table()
    assert table.lookup(1, 128, 1) == 1.0
    assert table.lookup(4, 2048, 8) == 124.0
    assert table.lookup(1, 512, 4) == 13.0


def test_lookup_takes_the_next_bucket_up():
    table = _table()
    assert table.lookup(2, 129, 3) == table.lookup(4, 512, 4) == 113.0
    assert table.lookup(1, 1, 1) == 1.0  # below the smallest bucket: the smallest
    assert table.lookup(3, 600, 5) == 124.0


def test_lookup_clamps_at_the_largest_bucket():
    table = _table()
    assert table.lookup(64, 100_000, 1000) == 124.0
    assert table.lookup(1, 4096, 9) == table.lookup(1, 2048, 8)


def test_row_and_step_costs():
    table = _table()
    np.testing.assert_array_equal(table.row(3, 300), [111.0, 112.0, 113.0, 114.0])
    np.testing.assert_array_equal(table.costs_for_counts(1, 128, 10), [1, 2, 3, 3, 4, 4, 4, 4, 4, 4])
    np.testing.assert_allclose(table.normalized_costs(1, 128, 4), [1, 2, 3, 3])


def test_table_is_immutable_and_validated():
    table = _table()
    with pytest.raises(ValueError):
        table.millis[0, 0, 0] = 5.0  # read-only
    with pytest.raises(ValueError):
        CostTable("d", "m", "f", [1], [1], [2, 1], [[[1.0, 2.0]]])  # not increasing
    with pytest.raises(ValueError):
        CostTable("d", "m", "f", [1], [1], [1, 2], [[[1.0]]])  # wrong shape
    with pytest.raises(ValueError):
        CostTable("d", "m", "f", [1], [1], [1], [[[0.0]]])  # zero cost cannot be divided by
    with pytest.raises(ValueError):
        CostTable("d", "m", "f", [], [1], [1], np.ones((0, 1, 1)))


def test_json_round_trip():
    base = _table()
    millis = np.array(base.millis)
    millis[0, 0, 0] = 1.0 / 3.0  # a float without a short decimal form
    table = CostTable(base.device, base.model_id, base.dtype, base.batch_sizes, base.context_buckets,
                      base.token_counts, millis)
    text = table.to_json()
    data = json.loads(text)
    assert data["format"] == "cast-cost-table/v1"
    assert np.array(data["millis"]).shape == (2, 3, 4)  # nested [B][C][N]
    assert CostTable.from_json(text) == table
    assert CostTable.from_json(text) != _table()


def test_from_json_rejects_other_documents():
    with pytest.raises(ValueError):
        CostTable.from_json(json.dumps({"format": "something-else"}))
    data = json.loads(_table().to_json())
    del data["millis"]
    with pytest.raises(ValueError, match="millis"):
        CostTable.from_json(json.dumps(data))


def test_linear_table():
    table = CostTable.linear(0.5, 2.0, batch_sizes=(1, 8), context_buckets=(256, 1024), token_counts=(1, 2, 4))
    assert table.millis.shape == (2, 2, 3)
    assert table.lookup(8, 1024, 4) == 4.0
    assert table.lookup(1, 256, 1) == 2.5


def test_normalized_slice_validates_shape():
    with pytest.raises(ValueError):
        NormalizedCostSlice((1, 2), (1,), np.ones((1, 1)))


def test_monotone_envelope_removes_noise_spikes_and_keeps_monotone_tables():
    # Two contexts of a measured CPU table: a burst of load inflated single cells (5.97, 14.77, 20.64).
    noisy = np.array([[[0.68, 5.97, 0.54, 0.57, 1.35], [14.77, 0.48, 20.64, 10.94, 12.08]]])  # [B=1, 2 ctx, 5 n]
    envelope = monotone_envelope(noisy)
    assert np.all(envelope <= noisy)
    for axis in range(3):
        assert np.all(np.diff(envelope, axis=axis) >= 0)
    np.testing.assert_allclose(envelope[0, 0], [0.48, 0.48, 0.54, 0.57, 1.35])
    np.testing.assert_allclose(envelope[0, 1], [0.48, 0.48, 10.94, 10.94, 12.08])
    clean = CostTable.linear(1.0, 2.0, batch_sizes=(1, 4), context_buckets=(8, 64), token_counts=(1, 2, 4)).millis
    np.testing.assert_array_equal(monotone_envelope(clean), clean)
