"""A small client for Prometheus' HTTP API: instant and range queries that never crash the caller.

Every answer is a ``QueryResult`` with a status (``ok``, ``empty``, ``error``, ``unreachable``):
an empty result or a refused query is data the analysis reports ("no traffic yet", "bad query"),
not an exception that aborts a rollout (argo-rollouts#1466).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import httpx

from monitoring import promql
from monitoring.catalog import MetricSpec
from monitoring.series import Series

OK, EMPTY, ERROR, UNREACHABLE = "ok", "empty", "error", "unreachable"


@dataclass(frozen=True)
class QueryResult:
    status: str
    series: list[Series] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


class Prometheus:
    """Queries one Prometheus server (``url`` like http://127.0.0.1:9090)."""

    def __init__(self, url: str, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self._client = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    def instant(self, query: str, time: float | None = None) -> QueryResult:
        """``/api/v1/query`` at ``time`` (now by default): one point per series."""
        params = {"query": query} | ({"time": api_time(time)} if time is not None else {})
        return self._get("/api/v1/query", params)

    def range(self, query: str, start: float, end: float, step: float) -> QueryResult:
        """``/api/v1/query_range`` from ``start`` to ``end`` every ``step`` seconds."""
        params = {"query": query, "start": api_time(start), "end": api_time(end), "step": f"{max(step, 0.001):.3f}"}
        return self._get("/api/v1/query_range", params)

    def ready(self) -> bool:
        try:
            return self._client.get(f"{self.url}/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def _get(self, path: str, params: dict) -> QueryResult:
        try:
            response = self._client.post(f"{self.url}{path}", data=params)
        except httpx.HTTPError as error:
            return QueryResult(UNREACHABLE, error=f"{self.url} did not answer ({type(error).__name__}: {error})")
        try:
            body = response.json()
        except ValueError:
            return QueryResult(ERROR, error=f"HTTP {response.status_code}: not a Prometheus API answer")
        if body.get("status") != "success":
            return QueryResult(ERROR, error=f"{body.get('errorType', 'error')}: {body.get('error', response.text[:200])}")
        data = body.get("data", {})
        series = [_series(item) for item in data.get("result", [])] if data.get("resultType") in ("vector", "matrix") else []
        return QueryResult(OK if series else EMPTY, series)


def api_time(t: float) -> str:
    """Unix seconds as the API takes them, in milliseconds rounded down: no point lies after the time asked for.

    (Rounded to the nearest, the point at a window's end could fall just past it and be cut.)
    """
    ms = math.floor(t * 1000)
    return f"{ms // 1000}.{ms % 1000:03d}"


def _series(item: dict) -> Series:
    labels = dict(item.get("metric", {}))
    name = labels.pop("__name__", "")
    raw = item["values"] if "values" in item else [item["value"]]
    return Series(name, labels, tuple((float(t), float(v)) for t, v in raw))


class PrometheusSource:
    """Raw catalog series over a window, read from Prometheus with a range query."""

    points_per_window = 500  # fine enough to see counter resets, far below the API's 11,000-point limit

    def __init__(self, client: Prometheus):
        self.client = client

    def look(self) -> str | None:
        """Nothing to do before a read: Prometheus scrapes on its own (``ScrapingSource.look`` scrapes)."""
        return None

    def read(self, spec: MetricSpec, start: float, end: float, series: str | None = None, **matchers: str) -> QueryResult:
        """The series' points at ``start``, every step after it, and at ``end`` itself.

        A range query's last point can fall up to one step before ``end``; the instant value at
        ``end`` is added so the window counts everything scraped until then. Prometheus stamps a
        sample with the time its scrape started, so each edge is exact to one scrape's latency: a
        scrape stamped just before ``start`` and answered after it counts its later requests
        before the window.
        """
        query = promql.raw(spec, series, **matchers)
        result = self.client.range(query, start, end, max((end - start) / self.points_per_window, 1.0))
        if not result.ok:
            return result
        at_end = {tuple(sorted(one.labels.items())): one for one in self.client.instant(query, end).series}
        merged = []
        for one in result.series:
            last = at_end.pop(tuple(sorted(one.labels.items())), None)
            later = last is not None and last.points[-1][0] > one.points[-1][0]
            merged.append(Series(one.name, one.labels, one.points + last.points[-1:]) if later else one)
        return QueryResult(result.status, merged + list(at_end.values()))  # + series born after the last step
