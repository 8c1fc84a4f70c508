"""Bayesian summaries for proportions: probability to beat control and expected loss.

Each arm's rate gets a Beta(1 + successes, 1 + failures) posterior; like GrowthBook's engine we
summarise the difference with a normal approximation of the two posteriors, which has closed
forms for both quantities (exact enough from a few dozen units per arm on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

from abtest.stats.result import OK, degenerate
from abtest.stats.sufficient import Proportion


@dataclass(frozen=True)
class Bayesian:
    """``chance_to_win``: P(candidate > control); ``expected_loss``: E[max(control - candidate, 0)] if promoted."""

    status: str
    chance_to_win: float | None = None
    expected_loss: float | None = None


def beta_moments(arm: Proportion) -> tuple[float, float]:
    a, b = 1 + arm.successes, 1 + arm.n - arm.successes
    return a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))


def chance_to_beat(control: Proportion, candidate: Proportion) -> Bayesian:
    """P(candidate's rate > control's) and the expected loss of choosing the candidate, under uniform priors."""
    if (result := degenerate("bayesian", control.n, candidate.n)) is not None:
        return Bayesian(result.status)
    mean_a, var_a = beta_moments(control)
    mean_b, var_b = beta_moments(candidate)
    mu, sigma = mean_b - mean_a, math.sqrt(var_a + var_b)
    chance = float(stats.norm.sf(0, mu, sigma))
    # E[max(-D, 0)] for D ~ N(mu, sigma^2)
    loss = float(sigma * stats.norm.pdf(mu / sigma) - mu * stats.norm.cdf(-mu / sigma))
    return Bayesian(OK, chance, loss)

