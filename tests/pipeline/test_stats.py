"""Seed statistics: Student-t quantiles, mean ± CI, and the three-valued "Did NORM help?" rule."""
from __future__ import annotations

import math

import pytest

from pipeline.stats import fmt_mean_ci, helped_verdict, mean_ci, paired, t_cdf, t_ppf

# two-sided 95% critical values of Student's t, from printed tables
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 29: 2.0452, 100: 1.9840}


@pytest.mark.parametrize("df,expected", sorted(T975.items()))
def test_t_quantile_matches_tables(df, expected):
    assert t_ppf(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_ppf(0.025, df) == pytest.approx(-expected, abs=1e-4)
    assert t_cdf(expected, df) == pytest.approx(0.975, abs=1e-5)


def test_t_cdf_df1_is_the_cauchy_distribution():
    for t in (-3.0, -0.5, 0.0, 0.7, 10.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-10)


def test_mean_ci_by_hand():
    e = mean_ci([84.5, 85.0, 86.0])
    mean = (84.5 + 85.0 + 86.0) / 3
    sd = math.sqrt(((84.5 - mean) ** 2 + (85.0 - mean) ** 2 + (86.0 - mean) ** 2) / 2)
    half = 4.3027 * sd / math.sqrt(3)
    assert e["n"] == 3 and e["mean"] == pytest.approx(mean) and e["sd"] == pytest.approx(sd)
    assert e["lo"] == pytest.approx(mean - half, abs=1e-3) and e["hi"] == pytest.approx(mean + half, abs=1e-3)
    one = mean_ci([0.8])
    assert one["mean"] == 0.8 and one["lo"] is None and one["half"] is None
    assert mean_ci([])["mean"] is None


def test_paired_differences_pair_by_key():
    assert paired({0: 0.9, 1: 0.8, 2: 0.7}, {1: 0.75, 0: 0.85, 3: 0.1}) == [(0, pytest.approx(0.05)), (1, pytest.approx(0.05))]


def test_helped_verdict_is_three_valued():
    # every seed clearly above: the CI excludes 0 -> yes; mirrored -> no
    assert helped_verdict(mean_ci([1.0, 1.1, 0.9]))[0] == "yes"
    assert helped_verdict(mean_ci([-1.0, -1.1, -0.9]))[0] == "no"
    # a mean of +0.5 with the spread of real seeds straddles 0 -> inconclusive, and says so
    verdict, why = helped_verdict(mean_ci([1.2, -0.3, 0.6]))
    assert verdict == "inconclusive" and "includes 0" in why
    # one seed: never yes or no, however large the difference
    for d in (25.0, -25.0, 0.1):
        verdict, why = helped_verdict(mean_ci([d]))
        assert verdict == "inconclusive" and "one seed" in why
    assert helped_verdict(mean_ci([]))[0] is None


def test_format():
    assert fmt_mean_ci(mean_ci([0.85, 0.87]), 100, "%") == "86.00% ± 12.71"  # t(0.975, 1) x sd / sqrt(2) = 12.706 x 0.01
    assert fmt_mean_ci(mean_ci([1.0]), signed=True) == "+1.00 (1 seed)"
    assert fmt_mean_ci({}) == "—"
