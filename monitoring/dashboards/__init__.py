"""Grafana dashboards as code: built from the metric catalog and the PromQL builders, written as JSON.

``stillhouse dashboards build`` writes ``monitoring/dashboards/json/<uid>.json`` (what Grafana's
provisioning in ``monitoring/grafana/provisioning`` loads); ``--check`` fails when the committed
JSON differs from what the code builds, and a test runs it.

- ``ab_experiment``: one route's control and candidate arm (split, outcome metrics with
  intervals, guardrail metrics, shadow agreement, the watch's verdict and p-values);
- ``serving``: the inference server per adapter (traffic, latency, errors, adapters, queue).
"""

from __future__ import annotations

import json
from pathlib import Path

from monitoring.dashboards import ab_experiment, serving
from monitoring.dashboards.panel import Dashboard, render

DASHBOARDS: tuple[Dashboard, ...] = (ab_experiment.DASHBOARD, serving.DASHBOARD)
JSON_DIR = Path(__file__).parent / "json"


def dashboard_json(spec: Dashboard) -> str:
    return json.dumps(render(spec), indent=2, sort_keys=True) + "\n"


def build(directory: Path = JSON_DIR) -> list[Path]:
    """Write every dashboard's JSON; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in DASHBOARDS:
        path = directory / f"{spec.uid}.json"
        path.write_text(dashboard_json(spec))
        written.append(path)
    return written


def stale(directory: Path = JSON_DIR) -> list[str]:
    """Dashboards whose committed JSON is missing or differs from what the code builds."""
    return [spec.uid for spec in DASHBOARDS
            if not (directory / f"{spec.uid}.json").exists() or (directory / f"{spec.uid}.json").read_text() != dashboard_json(spec)]
