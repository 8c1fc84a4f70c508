"""Sample size and power of a two-arm test (normal approximation, two-sided)."""

from __future__ import annotations

import math

from scipy import stats


def sample_size_per_arm(variance: float, mde: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Units per arm for a two-sided test of a difference ``mde`` with per-unit ``variance`` in each arm."""
    if mde <= 0 or variance <= 0 or not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"need mde > 0, variance > 0, 0 < alpha < 1 and 0 < power < 1; got {mde}, {variance}, {alpha}, {power}")
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return math.ceil(2 * variance * z * z / (mde * mde))


def proportion_sample_size_per_arm(baseline: float, mde: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Units per arm to detect ``baseline`` -> ``baseline + mde`` (absolute points), variances of both rates."""
    target = baseline + mde
    if not 0 < baseline < 1 or not 0 < target < 1:
        raise ValueError(f"baseline {baseline} and baseline + mde {target} must lie strictly between 0 and 1")
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    variance = baseline * (1 - baseline) + target * (1 - target)
    return math.ceil(variance * z * z / (mde * mde))


def power_at(n_per_arm: int, variance: float, mde: float, alpha: float = 0.05) -> float:
    """Power of the two-sided test with ``n_per_arm`` units per arm (both tails counted)."""
    if n_per_arm <= 0:
        return 0.0
    shift = mde / math.sqrt(2 * variance / n_per_arm)
    z = stats.norm.ppf(1 - alpha / 2)
    return float(stats.norm.sf(z - shift) + stats.norm.cdf(-z - shift))
