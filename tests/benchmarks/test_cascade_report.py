"""The cascade report's profile: where a learning policy's steps went, per mode and arm."""

from __future__ import annotations

from benchmarks.cascade_report import profile


def test_the_profile_gives_each_kind_of_step_its_share_of_the_time_and_its_speed():
    steps = [("writing", "small", 4, 20.0)] * 3 + [("writing", "lookup", 2, 10.0), ("copying", "lookup", 8, 10.0)]
    rows = [{"set": "edit", "batch": 1, "stack": "pair", "policy": "cascade", "kinds": steps},
            {"set": "edit", "batch": 1, "stack": "pair", "policy": "small", "kinds": steps}]  # not a learner with modes
    table = profile(rows)
    cells = {tuple(line.split(" | ")[4:6]): line.split(" | ")[6:] for line in table[2:]}
    assert len(table) == 2 + 3  # header, rule, one row per (mode, arm) of the cascade only
    assert cells["writing", "small"] == ["3", "0.75", "4.00", "20.0", "0.200 |"]  # 60 of 80 ms
    assert cells["writing", "lookup"] == ["1", "0.12", "2.00", "10.0", "0.200 |"]
    assert cells["copying", "lookup"] == ["1", "0.12", "8.00", "10.0", "0.800 |"]
