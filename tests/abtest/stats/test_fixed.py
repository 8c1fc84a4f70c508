"""Fixed-horizon tests against statsmodels / scipy and a published worked example."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats
from statsmodels.stats.proportion import proportions_ztest

from abtest.stats import fixed
from abtest.stats.result import EMPTY_ARM, NO_DATA, OK, TOO_FEW_SAMPLES, ZERO_VARIANCE
from abtest.stats.sufficient import Mean, Proportion


def test_newcombe_worked_example():
    # Newcombe (1998), Statistics in Medicine 17:873-890, example (a): 56/70 vs 48/80,
    # hybrid score interval for the difference: 0.0524 to 0.3339.
    result = fixed.two_proportions(Proportion(80, 48), Proportion(70, 56))
    assert result.status == OK
    assert result.estimate == pytest.approx(0.2)
    assert result.ci == pytest.approx((0.0524, 0.3339), abs=5e-5)


def test_two_proportion_p_value_is_statsmodels_pooled_z():
    control, candidate = Proportion(1200, 540), Proportion(1100, 561)
    result = fixed.two_proportions(control, candidate)
    _, expected = proportions_ztest([561, 540], [1100, 1200])
    assert result.p_value == pytest.approx(expected, rel=1e-9)
    assert result.relative_lift == pytest.approx((561 / 1100) / (540 / 1200) - 1)


def test_welch_matches_scipy_on_raw_values():
    rng = np.random.default_rng(7)
    a, b = rng.normal(1.0, 2.0, 40), rng.normal(1.6, 0.7, 25)
    result = fixed.welch(Mean.of(a), Mean.of(b))
    reference = scipy_stats.ttest_ind(b, a, equal_var=False)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    low, high = reference.confidence_interval(0.95)
    assert result.ci == pytest.approx((low, high), rel=1e-9)
    assert result.estimate == pytest.approx(b.mean() - a.mean())


def test_relative_lift_delta_method_by_hand():
    lift, (low, high) = fixed.relative_lift(2.0, 0.01, 2.5, 0.04)
    se = math.sqrt(0.04 / 4 + 2.5**2 * 0.01 / 16)
    assert lift == pytest.approx(0.25)
    assert (high - low) / 2 == pytest.approx(1.959964 * se, rel=1e-6)
    assert fixed.relative_lift(0.0, 0.01, 1.0, 0.01) == (None, None)


def test_degenerate_inputs_give_status_codes():
    assert fixed.two_proportions(Proportion(0, 0), Proportion(0, 0)).status == NO_DATA
    assert fixed.two_proportions(Proportion(0, 0), Proportion(5, 1)).status == EMPTY_ARM
    assert fixed.two_proportions(Proportion(50, 0), Proportion(40, 0)).status == ZERO_VARIANCE
    assert fixed.welch(Mean.of([1.0]), Mean.of([2.0, 3.0])).status == TOO_FEW_SAMPLES
    assert fixed.welch(Mean.of([3.0, 3.0]), Mean.of([3.0, 3.0, 3.0])).status == ZERO_VARIANCE
    with pytest.raises(ValueError, match="successes"):
        Proportion(3, 4)


counts = st.integers(min_value=0, max_value=10_000)


@st.composite
def proportions(draw):
    n = draw(counts)
    return Proportion(n, draw(st.integers(min_value=0, max_value=n)))


@settings(max_examples=200, deadline=None)
@given(proportions(), proportions())
def test_swapping_arms_negates_the_difference(a, b):
    forward, backward = fixed.two_proportions(a, b), fixed.two_proportions(b, a)
    assert forward.status == backward.status
    if forward.ok:
        assert forward.estimate == pytest.approx(-backward.estimate)
        assert forward.p_value == pytest.approx(backward.p_value)
        assert forward.ci[0] == pytest.approx(-backward.ci[1], abs=1e-9)
        assert 0 <= forward.p_value <= 1 and forward.ci[0] <= forward.estimate <= forward.ci[1]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=30), st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=30),
       st.floats(-100, 100))
@example([0.0, 0.0], [0.0, 7.523296835605403e-142], 0.0)  # tiny variances once underflowed to 0 / 0 in the degrees of freedom
@example([0.0, 1.8078275929914115e-286], [0.0, 1.0], 0.0)  # and a tiny control mean in the relative lift
def test_welch_is_shift_invariant(a, b, shift):
    base = fixed.welch(Mean.of(a), Mean.of(b))
    shifted = fixed.welch(Mean.of(x + shift for x in a), Mean.of(x + shift for x in b))
    # A shift can turn an exactly-zero variance into rounding noise; only compare well-conditioned cases.
    if base.ok and shifted.ok and min(Mean.of(a).variance, Mean.of(b).variance) > 1e-3:
        assert shifted.estimate == pytest.approx(base.estimate, abs=1e-6)
        assert shifted.p_value == pytest.approx(base.p_value, abs=1e-6)


def test_sufficient_statistics_add_like_the_pooled_data():
    a, b = [1.0, 2.0, 4.0], [0.5, -3.0]
    assert Mean.of(a) + Mean.of(b) == Mean.of(a + b)
    assert Proportion(10, 3) + Proportion(5, 5) == Proportion(15, 8)
    assert Proportion(4, 1).as_mean().variance == pytest.approx(np.var([1, 0, 0, 0], ddof=1))
