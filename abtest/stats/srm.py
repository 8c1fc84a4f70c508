"""Sample-ratio mismatch: do the arms' unit counts match the configured weights?

A chi-square goodness-of-fit test against the weights (GrowthBook's check): a p-value below
``threshold`` (0.001, so that a check repeated at every look rarely false-alarms) means the split
is broken and no comparison between the arms can be trusted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from scipy import stats

from abtest.stats.result import NO_DATA, OK, TOO_FEW_SAMPLES

SRM_THRESHOLD = 0.001
MIN_UNITS_PER_ARM = 8


@dataclass(frozen=True)
class SrmCheck:
    """The check's verdict: ``ok`` is False only on a significant mismatch (None when untestable)."""

    status: str
    p_value: float | None
    ok: bool | None
    observed: dict[str, int]
    expected: dict[str, float]


def srm(observed: Mapping[str, int], weights: Mapping[str, float], threshold: float = SRM_THRESHOLD,
        min_units: int = MIN_UNITS_PER_ARM) -> SrmCheck:
    """Chi-square of ``observed`` unit counts per arm against ``weights``; arms with weight 0 are left out."""
    arms = [arm for arm, weight in weights.items() if weight > 0]
    counts = {arm: int(observed.get(arm, 0)) for arm in arms}
    total = sum(counts.values())
    weight_sum = sum(weights[arm] for arm in arms)
    expected = {arm: weights[arm] / weight_sum * total for arm in arms} if weight_sum else {}
    if total == 0 or len(arms) < 2:
        return SrmCheck(NO_DATA, None, None, counts, expected)
    if min(counts.values()) < min_units:
        return SrmCheck(TOO_FEW_SAMPLES, None, None, counts, expected)
    p_value = float(stats.chisquare([counts[a] for a in arms], [expected[a] for a in arms]).pvalue)
    return SrmCheck(OK, p_value, p_value >= threshold, counts, expected)
