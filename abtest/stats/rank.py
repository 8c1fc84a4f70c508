"""Kayenta's judge: Mann-Whitney U over per-bucket values, with a Hodges-Lehmann shift interval.

Prometheus has no per-request rows, so the observations are time buckets (one value per step of
a range query, e.g. each minute's mean latency per arm): batch means, which also soften the
clustering that sticky per-user assignment puts into request-level counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from abtest.stats.result import OK, ZERO_VARIANCE, Comparison, degenerate


def mann_whitney(control: Sequence[float], candidate: Sequence[float], alpha: float = 0.05) -> Comparison:
    """Two-sided Mann-Whitney U (normal approximation, tie and continuity corrections) and the HL shift.

    ``estimate`` is the Hodges-Lehmann estimate of candidate - control (the median of all pairwise
    differences); ``ci`` its distribution-free interval from the order statistics of those
    differences (Bauer 1972), at confidence 1 - alpha. ``control``/``candidate`` are the arms' medians.
    """
    method = "mann_whitney"
    x = np.asarray([v for v in control if not math.isnan(v)], dtype=float)
    y = np.asarray([v for v in candidate if not math.isnan(v)], dtype=float)
    if (result := degenerate(method, len(x), len(y), minimum=2)) is not None:
        return result
    if np.ptp(np.concatenate([x, y])) == 0:
        return Comparison(method, ZERO_VARIANCE, float(np.median(x)), float(np.median(y)))
    test = stats.mannwhitneyu(y, x, alternative="two-sided", method="asymptotic", use_continuity=True)
    differences = np.sort(np.subtract.outer(y, x).ravel())
    m, n = len(x), len(y)
    z = stats.norm.ppf(1 - alpha / 2)
    k = int(math.floor(m * n / 2 - z * math.sqrt(m * n * (m + n + 1) / 12)))
    k = min(max(k, 0), len(differences) - 1)
    ci = (float(differences[k]), float(differences[len(differences) - 1 - k]))
    return Comparison(method, OK, float(np.median(x)), float(np.median(y)), float(np.median(differences)), ci, float(test.pvalue))
