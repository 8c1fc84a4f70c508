"""Fixed-horizon tests: read once at the planned sample size, never peeked at (see ``sequential``)."""

from __future__ import annotations

import math

from scipy import stats
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint

from abtest.stats.result import OK, ZERO_VARIANCE, Comparison, degenerate
from abtest.stats.sufficient import Mean, Proportion


def two_proportions(control: Proportion, candidate: Proportion, alpha: float = 0.05) -> Comparison:
    """Pooled two-proportion z-test; Newcombe's hybrid score interval for the difference."""
    method = "two_proportion_z"
    if (result := degenerate(method, control.n, candidate.n)) is not None:
        return result
    pooled = (control.successes + candidate.successes) / (control.n + candidate.n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / control.n + 1 / candidate.n))
    if se == 0:
        return Comparison(method, ZERO_VARIANCE, control.mean, candidate.mean)
    difference = candidate.mean - control.mean
    p_value = 2 * float(stats.norm.sf(abs(difference) / se))
    low, high = confint_proportions_2indep(
        candidate.successes, candidate.n, control.successes, control.n, method="newcomb", compare="diff", alpha=alpha
    )
    lift = relative_lift(control.mean, control.variance / control.n, candidate.mean, candidate.variance / candidate.n, alpha)
    return Comparison(method, OK, control.mean, candidate.mean, difference, (float(low), float(high)), float(p_value), *lift)


def welch(control: Mean, candidate: Mean, alpha: float = 0.05) -> Comparison:
    """Welch's t-test from (n, sum, sum of squares), with its interval for the difference of means."""
    method = "welch_t"
    if (result := degenerate(method, control.n, candidate.n, minimum=2)) is not None:
        return result
    va, vb = control.variance / control.n, candidate.variance / candidate.n
    if va + vb == 0:
        return Comparison(method, ZERO_VARIANCE, control.mean, candidate.mean)
    difference = candidate.mean - control.mean
    se = math.sqrt(va + vb)
    # Welch-Satterthwaite, scaled by the larger variance so tiny variances cannot underflow to 0 / 0.
    a, b = va / max(va, vb), vb / max(va, vb)
    dof = (a + b) ** 2 / (a * a / (control.n - 1) + b * b / (candidate.n - 1))
    p_value = 2 * float(stats.t.sf(abs(difference) / se, dof))
    half = float(stats.t.ppf(1 - alpha / 2, dof)) * se
    lift = relative_lift(control.mean, va, candidate.mean, vb, alpha)
    return Comparison(method, OK, control.mean, candidate.mean, difference, (difference - half, difference + half), float(p_value), *lift)


def relative_lift(
    control_mean: float, control_mean_variance: float, candidate_mean: float, candidate_mean_variance: float, alpha: float = 0.05
) -> tuple[float | None, tuple[float, float] | None]:
    """candidate / control - 1 with a delta-method interval; (None, None) when the control's mean is 0.

    The variances are those of the arms' *means* (variance / n). The arms are independent, so the
    covariance term of the ratio's delta method is 0.
    """
    if control_mean == 0:
        return None, None
    ratio = candidate_mean / control_mean
    # Divided twice rather than by control_mean**2, which underflows to 0 for tiny means.
    variance = (candidate_mean_variance + ratio * ratio * control_mean_variance) / control_mean / control_mean
    if not math.isfinite(ratio) or not math.isfinite(variance):
        return None, None
    half = float(stats.norm.ppf(1 - alpha / 2)) * math.sqrt(variance)
    return ratio - 1, (ratio - 1 - half, ratio - 1 + half)


def wilson(arm: Proportion, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of one arm's rate."""
    low, high = proportion_confint(arm.successes, arm.n, alpha=alpha, method="wilson")
    return float(low), float(high)
