"""Snapshots of a ``/metrics`` page over time, in a small JSONL state file: Prometheus for one process.

The embedded default needs no Prometheus server: ``stillhouse abtest analyze --metrics-url URL``
scrapes the router's ``/metrics`` once per call and appends what it read to the state file; the
analysis then reads windows of raw series from the file exactly as it reads them from Prometheus
(``read`` has ``PrometheusSource.read``'s signature and answers), so both give the same verdict.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from monitoring import promql
from monitoring.catalog import MetricSpec
from monitoring.prometheus import EMPTY, OK, UNREACHABLE, QueryResult
from monitoring.series import Series

PREFIX = "stillhouse_"


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of every Stillhouse sample in a Prometheus text page."""
    samples = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(PREFIX) and not sample.name.endswith("_created"):
                samples.append((sample.name, dict(sample.labels), float(sample.value)))
    return samples


class SnapshotStore:
    """Append-only snapshots of one metrics page; ``read`` serves them as windows of raw series."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._parsed: tuple[tuple[int, int], list[dict]] | None = None

    def scrape(self, url: str, timeout_s: float = 10.0, now: float | None = None) -> str | None:
        """Fetch ``url`` and append its samples; returns an error message instead of raising."""
        try:
            response = httpx.get(url, timeout=timeout_s)
            response.raise_for_status()
        except httpx.HTTPError as error:
            return f"{url} did not answer ({type(error).__name__}: {error})"
        self.append(parse(response.text), time.time() if now is None else now)
        return None

    def append(self, samples: list[tuple[str, dict[str, str], float]], at: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            file.write(json.dumps({"t": at, "samples": samples}, separators=(",", ":")) + "\n")

    def _snapshots(self) -> list[dict]:
        """The file's snapshots, parsed once per version of the file (an analysis reads a dozen series from it)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        stamp = (stat.st_mtime_ns, stat.st_size)
        if self._parsed is None or self._parsed[0] != stamp:
            self._parsed = stamp, [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return self._parsed[1]

    def read(self, spec: MetricSpec, start: float, end: float, series: str | None = None, **matchers: str) -> QueryResult:
        """The raw series ``promql.raw(spec, series, **matchers)`` names, between ``start`` and ``end``.

        As in a range query, the last snapshot at or before ``start`` stands for the value at ``start``.
        """
        name = promql.raw(spec, series).split("{")[0]
        snapshots = self._snapshots()
        if not snapshots:
            return QueryResult(UNREACHABLE, error=f"no snapshots in {self.path} yet")
        before = [s for s in snapshots if s["t"] <= start]
        window = ([before[-1]] if before else []) + [s for s in snapshots if start < s["t"] <= end]
        points: dict[tuple, list[tuple[float, float]]] = {}
        for snapshot in window:
            at = max(snapshot["t"], start)
            for sample_name, labels, value in snapshot["samples"]:
                if sample_name == name and all(labels.get(k) == v for k, v in matchers.items()):
                    points.setdefault(tuple(sorted(labels.items())), []).append((at, value))
        found = [Series(name, dict(key), tuple(values)) for key, values in points.items()]
        return QueryResult(OK if found else EMPTY, found)


class ScrapingSource:
    """A metrics page read through a snapshot store: ``look`` scrapes it once, ``read`` serves the snapshots.

    One look is one snapshot, so an analysis taken right after a look sees the page as it is now.
    """

    def __init__(self, url: str, state: Path):
        self.url, self.store = url, SnapshotStore(state)

    def look(self) -> str | None:
        """Scrape the page; an error message when it did not answer."""
        return self.store.scrape(self.url)

    def read(self, *args, **kwargs):
        return self.store.read(*args, **kwargs)
