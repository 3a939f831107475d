"""Bootstrap intervals: the arithmetic on fixed samples, the textbook width on a large normal sample, paired
ratios, and the 'no difference' reading."""

import numpy as np
import pytest

from packinfer_bench.stats import Interval, bootstrap, paired_ratio, verdict


def test_bootstrap_on_a_fixed_sample_is_the_percentile_interval_of_resampled_means():
    x = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    got = bootstrap(x, resamples=500, seed=7)
    idx = np.random.default_rng(7).integers(0, len(x), size=(500, len(x)))  # the same draws, by hand
    means = np.sort([x[i].mean() for i in idx])
    assert got.value == pytest.approx(3.875)
    assert got.low == pytest.approx(np.quantile(means, 0.025)) and got.high == pytest.approx(np.quantile(means, 0.975))
    assert bootstrap(x, resamples=500, seed=7) == got  # seeded: reproducible


def test_a_large_normal_sample_gives_the_textbook_width():
    x = np.random.default_rng(1).normal(10.0, 2.0, size=4000)
    ci = bootstrap(x)
    half = 1.96 * x.std() / np.sqrt(len(x))
    assert ci.low < x.mean() < ci.high
    assert (ci.high - ci.low) / 2 == pytest.approx(half, rel=0.1)


def test_paired_ratio_uses_the_same_units_for_both_sides():
    base = np.random.default_rng(2).lognormal(0, 1, size=300)
    ci = paired_ratio(0.9 * base, base)  # exactly 10% lower on every unit: no spread at all
    assert ci.value == pytest.approx(0.9) and ci.low == pytest.approx(0.9) and ci.high == pytest.approx(0.9)
    noisy = paired_ratio(base * np.random.default_rng(3).normal(1.0, 0.5, 300), base)
    assert noisy.low < 1.0 < noisy.high
    with pytest.raises(ValueError, match="differ in length"):
        paired_ratio(base[:3], base)


def test_verdicts():
    assert verdict(Interval(0.9, 0.85, 0.95)) == "better"
    assert verdict(Interval(0.98, 0.9, 1.05)) == "no difference"
    assert verdict(Interval(1.2, 1.1, 1.3)) == "worse"
    assert verdict(Interval(1.2, 1.1, 1.3), lower_is_better=False) == "better"
    assert bootstrap(np.array([np.nan])).value != bootstrap(np.array([np.nan])).value  # nan: nothing to say


def test_one_unit_has_a_value_and_no_interval():
    """One repeat's throughput: resampling it would give a zero-width interval and a verdict it cannot carry."""
    one = bootstrap(np.array([4.2]))
    assert one.value == 4.2 and np.isnan(one.low) and np.isnan(one.high)
    ratio = paired_ratio(np.array([3.0]), np.array([4.0]))
    assert ratio.value == 0.75 and np.isnan(ratio.low) and verdict(ratio) == "one sample"
