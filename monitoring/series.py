"""Time series as read back from Prometheus or from scraped snapshots, and exact window arithmetic.

Both sources give the same ``Series`` (a label set and its (time, value) points), so the A/B
analysis computes the same numbers from either. Window counts are taken from the raw counter
values, not from PromQL's ``increase()``, which extrapolates to the window's edges and returns
non-integer counts (prometheus/prometheus#3746):

- the increase of one series is the sum of its steps, where a drop means the counter was reset
  (a restarted process), so the value after the drop counts from zero;
- a series first seen after the window's start did not exist there: its first value counts from
  zero too (prometheus-client creates a labelled child at its first increment).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Series:
    """One labelled series: ``name`` as exported (``..._total``, ``..._bucket``), its labels and points."""

    name: str
    labels: Mapping[str, str]
    points: tuple[tuple[float, float], ...]  # (unix seconds, value), in time order

    def matches(self, **matchers: str) -> bool:
        return all(self.labels.get(key) == value for key, value in matchers.items())


def counter_increase(points: Iterable[tuple[float, float]], start: float, present_at_start: bool | None = None) -> float:
    """How much a counter grew over its points, resets handled.

    ``present_at_start``: whether the series already existed at the window's start; by default it
    did when its first point is at ``start`` or earlier.
    """
    points = [(t, v) for t, v in points if not math.isnan(v)]
    if not points:
        return 0.0
    if present_at_start is None:
        present_at_start = points[0][0] <= start
    total = 0.0 if present_at_start else points[0][1]
    for (_, before), (_, after) in zip(points, points[1:]):
        total += after - before if after >= before else after
    return total


def window_increase(series: Iterable[Series], start: float, by: tuple[str, ...] = (), step: float = 0.0) -> dict[tuple[str, ...], float]:
    """Counter increase per group of ``by`` label values, summed over the group's series.

    A series whose first point lies within ``step`` of ``start`` counts as present at the start
    (a range query's first point is at ``start``, up to the API's rounding).
    """
    totals: dict[tuple[str, ...], float] = {}
    for one in series:
        key = tuple(one.labels.get(label, "") for label in by)
        present = bool(one.points) and one.points[0][0] <= start + step
        totals[key] = totals.get(key, 0.0) + counter_increase(one.points, start, present)
    return totals


def quantile_from_buckets(buckets: Mapping[float, float], q: float) -> float | None:
    """The q-quantile of a histogram from cumulative bucket counts (``le`` -> count), as histogram_quantile does.

    Linear interpolation inside the bucket that holds the rank; the +Inf bucket returns the
    highest finite bound. None when the histogram is empty.
    """
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound
