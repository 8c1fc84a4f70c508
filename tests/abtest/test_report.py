"""The HTML report: one self-contained file whose plots render in a real headless Chromium."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
from PIL import Image
from prometheus_client import generate_latest

from abtest import analysis
from abtest.config import parse
from abtest.report import write_html
from monitoring.metrics import RouterMetrics
from monitoring.snapshots import SnapshotStore, parse as parse_metrics
from tests.binaries import CHROMIUM_PACKAGE, require

CONFIG = {
    "version": 1, "salt": "report",
    "routes": {"sentiment": {
        "metrics": {"correct": {"type": "boolean"}, "rating": {"type": "float"}},
        "arms": {"teacher": {"role": "control", "upstream": "http://127.0.0.1:1", "weight": 50},
                 "student": {"role": "candidate", "upstream": "http://127.0.0.1:2", "weight": 50}},
        "experiment": {"primary": "correct", "secondary": ["rating"], "min_samples_per_arm": 20,
                       "guardrails": {"latency_p95": {"max_relative_increase": 0.5}}},
    }},
}


def simulated(tmp_path):
    """Twenty minutes of a route where the student is right more often, as snapshots of /metrics."""
    rng = np.random.default_rng(0)
    metrics, store = RouterMetrics(), SnapshotStore(tmp_path / "snapshots.jsonl")
    t = 1_000.0
    store.append(parse_metrics(generate_latest(metrics.registry).decode()), t)
    for _ in range(20):
        for arm, rate in (("teacher", 0.6), ("student", 0.75)):
            for _ in range(30):
                metrics.observe_request("sentiment", arm, "success", duration_s=float(rng.exponential(0.3)), ttft_s=0.05,
                                        prompt_tokens=100 if arm == "teacher" else 20, generated_tokens=2)
                metrics.observe_feedback("sentiment", arm, "correct", float(rng.random() < rate))
                metrics.observe_feedback("sentiment", arm, "rating", float(rng.normal(3 + (arm == "student"), 1)))
        t += 60
        store.append(parse_metrics(generate_latest(metrics.registry).decode()), t)
    return store, 1_000.0, t


def test_the_report_is_self_contained_and_renders(tmp_path):
    store, start, end = simulated(tmp_path)
    config = parse(CONFIG)
    result, history = analysis.analyze_route(config, "sentiment", store, start, end, points=10)
    assert len(history) == 10 and history[-1] == result
    page = write_html(tmp_path / "report.html", result, history, config.routes["sentiment"].weights())
    text = page.read_text()
    assert text.count("<svg") == 3 and "Verdict: promote" in text
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', text) and "<link" not in text  # nothing loads from elsewhere

    chromium = require("chromium", CHROMIUM_PACKAGE)
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2400)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # plots and text, not a blank page


def test_batch_means_take_one_observation_per_bucket_and_arm(tmp_path):
    store, start, end = simulated(tmp_path)
    config = parse(CONFIG)
    by_request, _ = analysis.analyze_route(config, "sentiment", store, start, end)
    by_bucket, _ = analysis.analyze_route(config, "sentiment", store, start, end, bucket_s=120)
    assert by_request.unit == "request" and by_bucket.unit == "bucket of 120 s"
    request_row, bucket_row = by_request.metrics[0], by_bucket.metrics[0]
    assert "n = 600 control" in request_row.detail and "n = 10 control" in bucket_row.detail  # 20 minutes / 2
    assert bucket_row.estimate == pytest.approx(request_row.estimate)  # equal buckets: the mean of means is the mean
    assert bucket_row.ci[1] - bucket_row.ci[0] != pytest.approx(request_row.ci[1] - request_row.ci[0])


def test_a_rate_of_exactly_one_still_plots(tmp_path):
    route = {**CONFIG["routes"]["sentiment"], "metrics": {"always": {"type": "boolean"}}, "experiment": {"primary": "always"}}
    config = parse({**CONFIG, "routes": {"sentiment": route}})
    metrics, store = RouterMetrics(), SnapshotStore(tmp_path / "snapshots.jsonl")
    store.append(parse_metrics(generate_latest(metrics.registry).decode()), 0.0)
    for arm in ("teacher", "student"):
        for _ in range(300):  # Wilson's upper bound at 300 of 300 is 0.9999999999999998, just below the mean
            metrics.observe_request("sentiment", arm, "success")
            metrics.observe_feedback("sentiment", arm, "always", 1.0)
    store.append(parse_metrics(generate_latest(metrics.registry).decode()), 60.0)
    result, history = analysis.analyze_route(config, "sentiment", store, 0.0, 60.0, points=3)
    assert result.metrics[0].control == 1.0 and result.metrics[0].control_ci[1] == pytest.approx(1.0)
    write_html(tmp_path / "report.html", result, history, config.routes["sentiment"].weights())
