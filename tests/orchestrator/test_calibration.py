from orchestrator.calibration import LIMITS, ValueCalibration


def test_the_scale_follows_accepted_tokens_per_unit_of_value():
    scale = ValueCalibration()
    for _ in range(200):
        scale.observe(verified_value=2.0, accepted=3)  # greedy: 1.5 tokens accepted per unit of value
    assert abs(scale.scale - 1.5) < 0.01


def test_steps_without_drafted_value_teach_nothing_and_outliers_are_capped():
    scale = ValueCalibration()
    scale.observe(verified_value=0.0, accepted=0)
    assert scale.scale == 1.0
    for _ in range(1000):
        scale.observe(verified_value=1e-6, accepted=5)
    assert scale.scale <= LIMITS[1]


def test_the_first_steps_set_the_scale_at_once():
    """The gate judges drafting on CAST's first trees: those must already be sized by the measured scale."""
    scale = ValueCalibration()
    scale.observe(verified_value=2.0, accepted=3)
    assert scale.scale == 1.5
    scale.observe(verified_value=2.0, accepted=2)
    assert abs(scale.scale - 1.25) < 1e-12  # the mean of the two
