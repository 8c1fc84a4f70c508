"""Always-valid inference under continuous monitoring: the normal-mixture SPRT (mSPRT).

Johari, Pekelis and Walsh, "Always Valid Inference: Continuous Monitoring of A/B Tests"
(Operations Research 70(3), 2022; the "Peeking at A/B Tests" KDD 2017 paper): with the observed
difference ``d`` of the arms' means, its variance ``s2`` (var_a / n_a + var_b / n_b) and a normal
mixture N(theta0, tau2) over the alternative, the likelihood ratio is

    Lambda = sqrt(s2 / (s2 + tau2)) * exp(tau2 * (d - theta0)^2 / (2 * s2 * (s2 + tau2)))

(with n pairs and s2 = V / n this is the paper's sqrt(V/(V+n tau2)) exp(n^2 tau2 (Zbar-theta0)^2 /
(2V(V+n tau2)))). ``1 / Lambda`` is an always-valid p-value: rejecting when it falls below alpha
at *any* look keeps the false-positive rate at alpha. Over a sequence of looks the p-value is the
running minimum (``running_p_values``). Inverting ``Lambda < 1/alpha`` in theta0 gives the
confidence sequence: intervals that hold at every look simultaneously.

Validity holds for any mixing variance tau2 > 0; tau2 only moves power between small and large
effects. We set tau2 = mde^2, the square of the plan's minimum detectable effect on the absolute
scale, so the test is most sensitive around the effect the experiment was sized for.
(The closed form for tau2 in the R package mixtureSPRT, which our reference could not verify
against the paper, is deliberately not used.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from abtest.stats.result import OK, ZERO_VARIANCE, Comparison, degenerate
from abtest.stats.sufficient import Mean, Proportion


@dataclass(frozen=True)
class Sequential:
    """One look of the mSPRT: the always-valid p-value and the confidence sequence at this look."""

    comparison: Comparison  # estimate and ci are the confidence sequence; p_value the always-valid one
    log_likelihood_ratio: float | None  # log Lambda: Lambda itself overflows on large effects


def msprt(control: Proportion | Mean, candidate: Proportion | Mean, mde: float, alpha: float = 0.05, theta0: float = 0.0) -> Sequential:
    """Always-valid p-value and confidence sequence for candidate - control at this look."""
    method = "msprt"
    if mde <= 0 or not 0 < alpha < 1:
        raise ValueError(f"msprt needs mde > 0 and 0 < alpha < 1, got mde={mde}, alpha={alpha}")
    minimum = 1 if isinstance(control, Proportion) else 2
    if (result := degenerate(method, control.n, candidate.n, minimum)) is not None:
        return Sequential(result, None)
    s2 = control.variance / control.n + candidate.variance / candidate.n
    if isinstance(control, Proportion) and s2 == 0:
        # Both arms all-success or all-failure so far: use the pooled rate's variance when it is informative.
        pooled = (control.successes + candidate.successes) / (control.n + candidate.n)
        s2 = pooled * (1 - pooled) * (1 / control.n + 1 / candidate.n)
    if s2 == 0:
        return Sequential(Comparison(method, ZERO_VARIANCE, control.mean, candidate.mean), None)
    tau2 = mde * mde
    d = candidate.mean - control.mean
    log_ratio = 0.5 * math.log(s2 / (s2 + tau2)) + tau2 * (d - theta0) ** 2 / (2 * s2 * (s2 + tau2))
    p_value = min(1.0, math.exp(-log_ratio))
    # Lambda(theta) < 1/alpha  <=>  (d - theta)^2 < 2 s2 (s2 + tau2) / tau2 * (ln(1/alpha) + 0.5 ln((s2 + tau2) / s2))
    half = math.sqrt(2 * s2 * (s2 + tau2) / tau2 * (math.log(1 / alpha) + 0.5 * math.log((s2 + tau2) / s2)))
    lift = None
    if control.mean:
        lift = d / control.mean
    comparison = Comparison(method, OK, control.mean, candidate.mean, d, (d - half, d + half), p_value, lift)
    return Sequential(comparison, log_ratio)


def running_p_values(p_values: Iterable[float | None]) -> list[float | None]:
    """The always-valid p-value over successive looks: the running minimum (None until the first test)."""
    out, best = [], None
    for p in p_values:
        if p is not None:
            best = p if best is None else min(best, p)
        out.append(best)
    return out
