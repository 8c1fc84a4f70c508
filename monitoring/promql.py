"""PromQL builders over the metric catalog: the one place queries are spelled.

Dashboards, recording rules and the A/B analysis build their queries here, from
``monitoring.catalog`` specs, so a metric or label typo fails when the query is built, not as an
empty panel. The builders know what each kind allows:

- counters and histogram series accumulate, so ``rate()`` / ``increase()`` apply;
- gauges are read as they are (``instant``): a windowed function over a gauge is refused;
- exact window counts for statistics come from ``raw`` series read at both ends of the window
  (differenced by the caller, resets handled), because ``increase()`` extrapolates to the window
  edges and returns non-integer counts (prometheus/prometheus#3746).

Matcher values starting with ``$`` are Grafana template variables and are passed through as is;
other values of a bounded label (``outcome``, ``reason``, ...) must be in its vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

from monitoring.catalog import Kind, MetricSpec, SufficientStats

HISTOGRAM_SERIES = ("bucket", "count", "sum")


class Regex(str):
    """A matcher value compared with ``=~`` (e.g. ``Regex("success|fallback")``)."""


def selector(spec: MetricSpec, series: str | None = None, **matchers: str) -> str:
    """``name{label="value", ...}``; ``series`` picks a histogram's bucket, count or sum."""
    name = spec.name
    allowed = set(spec.labels)
    if spec.kind is Kind.HISTOGRAM:
        if series not in HISTOGRAM_SERIES:
            raise ValueError(f"{spec.name} is a histogram: pick series= one of {HISTOGRAM_SERIES}")
        name = f"{spec.name}_{series}"
        if series == "bucket":
            allowed.add("le")
    elif series is not None:
        raise ValueError(f"{spec.name} is a {spec.kind.value}: it has no {series!r} series")
    parts = []
    for label, value in matchers.items():
        if label not in allowed:
            raise ValueError(f"{spec.name} has no label {label!r}; its labels are {sorted(allowed)}")
        if isinstance(value, Regex):
            for alternative in value.split("|"):
                _check(spec, label, alternative)
            parts.append(f'{label}=~"{value}"')
        else:
            _check(spec, label, value)
            parts.append(f'{label}="{value}"')
    return f"{name}{{{','.join(parts)}}}" if parts else name


def _check(spec: MetricSpec, label: str, value: str) -> None:
    if not value.startswith("$"):
        spec.check_value(label, value)


def _by(spec: MetricSpec, by: Iterable[str], extra: tuple[str, ...] = ()) -> str:
    labels = [*by, *extra]
    unknown = [label for label in labels if label not in (*spec.labels, "le")]
    if unknown:
        raise ValueError(f"{spec.name} has no label(s) {unknown} to aggregate by; its labels are {list(spec.labels)}")
    return f"sum by ({', '.join(labels)}) " if labels else "sum "


def _windowed(function: str, spec: MetricSpec, window: str, by: Iterable[str], series: str | None, matchers: dict) -> str:
    if not spec.windowable:
        raise TypeError(f"{spec.name} is a gauge: read it with instant(), a window function does not apply")
    if spec.kind is Kind.HISTOGRAM and series is None:
        series = "count"
    extra = ("le",) if series == "bucket" else ()
    return f"{_by(spec, by, extra)}({function}({selector(spec, series, **matchers)}[{window}]))"


def rate(spec: MetricSpec, window: str, by: Iterable[str] = (), series: str | None = None, **matchers: str) -> str:
    """Per-second rate of a counter (or a histogram's ``count`` series by default), summed by ``by``."""
    return _windowed("rate", spec, window, by, series, matchers)


def increase(spec: MetricSpec, window: str, by: Iterable[str] = (), series: str | None = None, **matchers: str) -> str:
    """Increase over ``window``, summed by ``by`` (extrapolated: for display, not for exact counts)."""
    return _windowed("increase", spec, window, by, series, matchers)


def quantile(q: float, spec: MetricSpec, window: str, by: Iterable[str] = (), **matchers: str) -> str:
    """``histogram_quantile`` of a histogram over ``window``, per ``by`` (``le`` is kept for it)."""
    if spec.kind is not Kind.HISTOGRAM:
        raise TypeError(f"{spec.name} is a {spec.kind.value}: quantiles need a histogram")
    if not 0 < q < 1:
        raise ValueError(f"quantile {q} must be between 0 and 1")
    return f"histogram_quantile({q}, {_windowed('rate', spec, window, by, 'bucket', matchers)})"


def instant(spec: MetricSpec, by: Iterable[str] = (), aggregation: str = "sum", series: str | None = None, **matchers: str) -> str:
    """A gauge (or any series, e.g. a histogram's ``sum``) as it is now, aggregated by ``by``."""
    by = list(by)
    _by(spec, by)
    grouping = f" by ({', '.join(by)})" if by else ""
    return f"{aggregation}{grouping} ({selector(spec, series, **matchers)})"


def raw(spec: MetricSpec, series: str | None = None, **matchers: str) -> str:
    """The un-aggregated series, to read at both ends of a window and difference per series."""
    if spec.kind is Kind.HISTOGRAM and series is None:
        series = "count"
    return selector(spec, series, **matchers)


def ratio(numerator: str, denominator: str) -> str:
    """``numerator / denominator`` with both sides parenthesised."""
    return f"({numerator}) / ({denominator})"


def sufficient_stats(group: SufficientStats, window: str, by: Iterable[str] = (), **matchers: str) -> dict[str, str]:
    """Windowed n, sum and sum of squares of an outcome metric (sum = positive part - negative part)."""
    by = list(by)
    return {
        "n": increase(group.count, window, by, **matchers),
        "sum": f"{increase(group.sum_positive, window, by, **matchers)} - {increase(group.sum_negative, window, by, **matchers)}",
        "sum_squares": increase(group.sum_squares, window, by, **matchers),
    }
