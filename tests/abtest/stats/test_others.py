"""SRM, Mann-Whitney with Hodges-Lehmann, multiple-testing corrections, power and the Bayesian summary."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower

from abtest.stats import bayes, multiple, power, rank, srm
from abtest.stats.result import OK, TOO_FEW_SAMPLES, ZERO_VARIANCE
from abtest.stats.sufficient import Mean, Proportion, batch_means


def test_srm_flags_52_48_at_10k_but_not_an_intended_95_5_split():
    broken = srm.srm({"a": 5200, "b": 4800}, {"a": 50, "b": 50})
    assert broken.ok is False and broken.p_value == pytest.approx(scipy_stats.chisquare([5200, 4800]).pvalue)
    intended = srm.srm({"control": 9480, "candidate": 520}, {"control": 95, "candidate": 5})
    assert intended.ok is True
    assert srm.srm({"a": 7, "b": 9}, {"a": 1, "b": 1}).status == TOO_FEW_SAMPLES
    shadow = srm.srm({"a": 100, "b": 104, "shadow": 40}, {"a": 1, "b": 1, "shadow": 0})
    assert shadow.ok is True and "shadow" not in shadow.observed


def test_mann_whitney_against_scipy_and_brute_force_hodges_lehmann():
    rng = np.random.default_rng(2)
    x, y = rng.exponential(1.0, 30), rng.exponential(1.0, 25) + 0.4
    result = rank.mann_whitney(x, y)
    assert result.p_value == pytest.approx(scipy_stats.mannwhitneyu(y, x, method="asymptotic").pvalue)
    assert result.estimate == pytest.approx(np.median([b - a for a in x for b in y]))
    assert result.ci[0] <= result.estimate <= result.ci[1]
    assert rank.mann_whitney([1.0, 1.0], [1.0, 1.0, 1.0]).status == ZERO_VARIANCE
    assert rank.mann_whitney([1.0], [2.0, 3.0]).status == TOO_FEW_SAMPLES


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=3, max_size=25), st.lists(st.floats(0, 100), min_size=3, max_size=25),
       st.floats(-50, 50))
def test_hodges_lehmann_shifts_with_the_candidate(x, y, shift):
    base, moved = rank.mann_whitney(x, y), rank.mann_whitney(x, [v + shift for v in y])
    if base.ok and moved.ok:
        assert moved.estimate == pytest.approx(base.estimate + shift, abs=1e-6)
        assert moved.ci == pytest.approx((base.ci[0] + shift, base.ci[1] + shift), abs=1e-6)


def test_corrections_match_statsmodels_and_keep_missing_tests_in_place():
    p = [0.01, 0.04, 0.03, 0.2]
    assert multiple.adjust(p, "holm") == pytest.approx(list(multipletests(p, method="holm")[1]))
    assert multiple.adjust(p, "bh") == pytest.approx(list(scipy_stats.false_discovery_control(p)))
    assert multiple.adjust([0.01, None, 0.04, 0.03], "holm") == pytest.approx([0.03, None, 0.06, 0.06])
    with pytest.raises(ValueError, match="correction"):
        multiple.adjust(p, "bonferonni")


def test_sample_size_matches_statsmodels_and_reaches_the_power():
    n = power.sample_size_per_arm(variance=4.0, mde=0.5)
    assert n == int(np.ceil(NormalIndPower().solve_power(effect_size=0.25, alpha=0.05, power=0.8)))
    assert power.power_at(n, 4.0, 0.5) >= 0.8 > power.power_at(n - 30, 4.0, 0.5)
    assert power.proportion_sample_size_per_arm(0.5, 0.05) == pytest.approx(1562, abs=2)
    with pytest.raises(ValueError, match="between 0 and 1"):
        power.proportion_sample_size_per_arm(0.98, 0.05)


def test_bayesian_chance_to_beat_matches_monte_carlo():
    control, candidate = Proportion(400, 120), Proportion(380, 133)
    result = bayes.chance_to_beat(control, candidate)
    rng = np.random.default_rng(0)
    a = rng.beta(121, 281, 400_000)
    b = rng.beta(134, 248, 400_000)
    assert result.status == OK
    assert result.chance_to_win == pytest.approx((b > a).mean(), abs=0.01)
    assert result.expected_loss == pytest.approx(np.maximum(a - b, 0).mean(), abs=0.002)
    assert bayes.chance_to_beat(Proportion(0, 0), candidate).status != OK


def test_batch_means_take_one_observation_per_non_empty_bucket():
    buckets = [Mean.of([1.0, 3.0]), Mean(0, 0.0, 0.0), Mean.of([5.0])]
    assert batch_means(buckets) == Mean.of([2.0, 5.0])
