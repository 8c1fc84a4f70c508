"""mSPRT: the paper's equal-n form, the confidence-sequence duality, and validity under peeking."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abtest.stats import sequential
from abtest.stats.result import EMPTY_ARM, OK, ZERO_VARIANCE
from abtest.stats.sufficient import Mean, Proportion


def test_equal_n_matches_the_papers_form():
    # Johari et al.: Lambda_n = sqrt(V/(V+n tau2)) exp(n^2 tau2 Zbar^2 / (2V(V+n tau2))), V = var_a + var_b.
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 200), rng.normal(0.2, 1.5, 200)
    control, candidate = Mean.of(a), Mean.of(b)
    n, tau2, z = 200, 0.1**2, b.mean() - a.mean()
    v = control.variance + candidate.variance
    expected = math.sqrt(v / (v + n * tau2)) * math.exp(n * n * tau2 * z * z / (2 * v * (v + n * tau2)))
    result = sequential.msprt(control, candidate, mde=0.1)
    assert math.exp(result.log_likelihood_ratio) == pytest.approx(expected, rel=1e-9)
    assert result.comparison.p_value == pytest.approx(min(1, 1 / expected), rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.integers(20, 5000), st.integers(20, 5000), st.floats(0.05, 0.95), st.floats(0.05, 0.95), st.floats(0.005, 0.3))
def test_confidence_sequence_excludes_zero_exactly_when_p_is_below_alpha(na, nb, pa, pb, mde):
    result = sequential.msprt(Proportion(na, round(na * pa)), Proportion(nb, round(nb * pb)), mde=mde).comparison
    assert result.status == OK
    low, high = result.ci
    excluded = low > 0 or high < 0
    assert excluded == (result.p_value < 0.05) or math.isclose(result.p_value, 0.05, rel_tol=1e-6)


def test_aa_false_positive_rate_stays_below_alpha_under_continuous_peeking():
    rng = np.random.default_rng(11)
    experiments, looks, per_look = 300, 30, 50
    rejected = 0
    for _ in range(experiments):
        a = b = Proportion(0, 0)
        for _ in range(looks):
            a += Proportion(per_look, int(rng.binomial(per_look, 0.3)))
            b += Proportion(per_look, int(rng.binomial(per_look, 0.3)))
            result = sequential.msprt(a, b, mde=0.05).comparison
            if result.ok and result.p_value < 0.05:
                rejected += 1
                break
    assert rejected / experiments <= 0.05


def test_a_real_effect_is_found():
    rng = np.random.default_rng(5)
    a, b = Proportion(4000, int(rng.binomial(4000, 0.30))), Proportion(4000, int(rng.binomial(4000, 0.36)))
    result = sequential.msprt(a, b, mde=0.05).comparison
    assert result.p_value < 0.01 and result.ci[0] > 0


def test_running_p_values_and_degenerate_looks():
    assert sequential.running_p_values([None, 0.5, 0.7, 0.2, 0.3]) == [None, 0.5, 0.5, 0.2, 0.2]
    assert sequential.msprt(Proportion(0, 0), Proportion(3, 1), mde=0.1).comparison.status == EMPTY_ARM
    # an all-success arm against an all-failure arm is tested through the pooled variance; all-success twice is not
    assert sequential.msprt(Proportion(10, 10), Proportion(12, 0), mde=0.1).comparison.status == OK
    assert sequential.msprt(Proportion(10, 10), Proportion(12, 12), mde=0.1).comparison.status == ZERO_VARIANCE
    with pytest.raises(ValueError, match="mde"):
        sequential.msprt(Proportion(10, 1), Proportion(10, 2), mde=0)
