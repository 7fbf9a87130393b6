"""The lab's statistics against known values and scipy."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from bnlab.lab import stats


def test_welch_tost_matches_two_one_sided_scipy_tests():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.0, 1.0, 7), rng.normal(0.3, 2.0, 9)
    margin = 0.8
    lower = scipy_stats.ttest_ind(a + margin, b, equal_var=False, alternative="greater").pvalue
    upper = scipy_stats.ttest_ind(a - margin, b, equal_var=False, alternative="less").pvalue
    assert stats.welch_tost(a, b, margin) == pytest.approx(max(lower, upper), rel=1e-10)
    with pytest.raises(ValueError, match="margin"):
        stats.welch_tost(a, b, 0.0)
    assert np.isnan(stats.welch_tost([1.0], b, margin))


def test_hedges_g_known_value():
    # means 3 and 5, sample variances 2.5 and 2.5 -> d = -2/sqrt(2.5); J = 1 - 3/(4*10-9)
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 4.0, 5.0, 6.0, 7.0]
    expected = (1 - 3 / 31) * (-2 / np.sqrt(2.5))
    assert stats.hedges_g(a, b) == pytest.approx(expected, rel=1e-12)
    assert np.isnan(stats.hedges_g([1.0], b)) and np.isnan(stats.hedges_g([1, 1], [1, 1]))


def test_bootstrap_mean_interval_matches_scipy_percentile_bootstrap():
    values = np.random.default_rng(2).normal(10.0, 3.0, 200)
    ours = stats.mean_ci(values[:, None].T[0], resamples=4000)
    theirs = scipy_stats.bootstrap(
        (values,), np.mean, method="percentile", n_resamples=4000, random_state=3
    ).confidence_interval
    width = theirs.high - theirs.low
    assert ours.estimate == pytest.approx(values.mean())
    assert ours.low == pytest.approx(theirs.low, abs=0.1 * width)
    assert ours.high == pytest.approx(theirs.high, abs=0.1 * width)
    # and the normal-theory interval, mean ± 1.96 s/√n
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert (ours.high - ours.low) / 2 == pytest.approx(half, rel=0.1)


def test_bootstrap_over_examples_when_one_seed():
    correct = (np.arange(1000) % 10 < 9).astype(float)[None]  # one seed, 90% accuracy
    interval = stats.mean_ci(correct)
    half = 1.96 * np.sqrt(0.9 * 0.1 / 1000)  # binomial standard error
    assert interval.estimate == pytest.approx(0.9)
    assert (interval.high - interval.low) / 2 == pytest.approx(half, rel=0.15)
    point = stats.mean_ci([0.7])  # one seed, no examples: no spread to resample
    assert point.low == point.high == point.estimate == pytest.approx(0.7)


def test_paired_difference_cancels_shared_seed_noise():
    seed_effect = np.array([0.0, 5.0, -5.0, 10.0, -10.0])
    a, b = seed_effect + 1.0, seed_effect  # a is b + 1 on every seed
    paired = stats.difference_ci(a, b)
    assert paired.low == pytest.approx(1.0) and paired.high == pytest.approx(1.0)
    assert stats.decide(paired, margin=0.5) == "better"


def test_decide_rules():
    interval = stats.Interval
    assert stats.decide(interval(0.02, 0.011, 0.03), 0.01) == "better"
    assert stats.decide(interval(0.02, 0.009, 0.03), 0.01) == "undecided"
    assert stats.decide(interval(-0.02, -0.03, -0.011), 0.01) == "worse"
    assert stats.decide(interval(0.0, -0.004, 0.004), 0.005) == "equivalent"
    assert stats.decide(interval(0.0, -0.006, 0.004), 0.005) == "undecided"
    assert stats.decide(interval(0.0, float("nan"), 1.0), 0.005) == "undecided"


def test_slope_weights_give_least_squares_slope():
    levels = [1.0, 2.0, 4.0, 8.0]
    y = np.array([0.5, 1.0, 3.0, 2.0])
    expected = scipy_stats.linregress(levels, y).slope
    assert stats.slope_weights(levels) @ y == pytest.approx(expected)


def test_sensitivity_line():
    rule = lambda margin: 0.012 > margin  # noqa: E731
    assert stats.sensitivity(rule, 0.01, (0.005, 0.02)).startswith("sensitive: flips at 0.02")
    assert stats.sensitivity(rule, 0.01, (0.005, 0.011)).startswith("robust")


def test_interval_formatting():
    assert stats.Interval(0.5, 0.4, 0.6).format(".1f", 100, "%") == "50.0 [40.0, 60.0]%"


def test_exceeds_and_equivalent():
    interval = stats.Interval
    assert stats.exceeds(interval(2.0, 1.5, 2.5), 1.0) is True
    assert stats.exceeds(interval(0.5, 0.2, 0.8), 1.0) is False
    assert stats.exceeds(interval(1.0, 0.5, 1.5), 1.0) is None
    assert stats.equivalent(interval(0.0, -0.004, 0.004), 0.005) is True
    assert stats.equivalent(interval(0.02, 0.01, 0.03), 0.005) is False
    assert stats.equivalent(interval(0.004, -0.002, 0.01), 0.005) is None
