"""Every dashboard panel query and every rule, run against a real Prometheus scraping a real stack.

The server on the tiny model, the router in front of it (a control, a candidate, a dead arm that
falls back, a shadow arm, an output check) and a rollout watch are scraped by Prometheus with the
shipped rules. After traffic and feedback through both arms, each query must return series with
the labels its panel shows and plausible values; a metric-name typo anywhere returns nothing and
fails here.
"""

from __future__ import annotations

import math
import random
import re
import time

import httpx
import lorax
import pytest
import yaml
from prometheus_client import start_http_server

from abtest.rollout import Watch
from monitoring import dashboards, rules
from monitoring.metrics import RolloutMetrics
from monitoring.prometheus import PrometheusSource
from serving.loopback import free_port
from serving.registry import Registry
from tests.abtest.harness import running_router
from tests.lora_factory import make_lora_adapter
from tests.monitoring.prometheus_harness import running_prometheus, wait_until_scraped
from tests.serving.server_harness import running_server

VARIABLES = {"$route": "sentiment", "$control": "teacher", "$candidate": "student", "$__rate_interval": "1m", "$__range": "10m"}


def substitute(expr: str) -> str:
    """The query as Grafana sends it, with the dashboard's variables filled in."""
    return re.sub(r"\$[a-z_]+", lambda match: VARIABLES[match.group()], expr)


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_base_dir):
    """The whole stack under traffic, scraped by Prometheus; yields (prometheus, requests answered per arm)."""
    root = tmp_path_factory.mktemp("live")
    registry = Registry(root / "registry")
    registry.add(make_lora_adapter(tiny_base_dir, root / "student", r=8, alpha=16, seed=3, scale=0.2), "student", base_dir=tiny_base_dir)
    with running_server(tiny_base_dir, root / "registry", request_log=root / "server.db") as (server_url, _):
        arm = {"upstream": server_url}
        route = {
            "mode": "template", "input": "text",
            "metrics": {"correct": {"type": "boolean"}},
            "checks": {"valid_output": {"labels": ["positive", "negative"]}},
            "arms": {
                "teacher": {**arm, "role": "control", "template": "Review: {{text}}\nSentiment:", "weight": 1, "fallback": True},
                "student": {**arm, "role": "candidate", "adapter": "student@v1", "template": "{{text}}", "weight": 1},
                "broken": {"role": "candidate", "upstream": f"http://127.0.0.1:{free_port()}", "template": "{{text}}", "weight": 0},
                "mirror": {**arm, "role": "candidate", "adapter": "student@v1", "template": "{{text}}", "weight": 0},
            },
            "shadow": [{"arm": "mirror", "fraction": 0.5}],
            "experiment": {"primary": "correct", "secondary": ["valid_output"], "min_samples_per_arm": 5,
                           "guardrails": {"latency_p95": {"max_relative_increase": 10}}},
        }
        traffic = {"version": 1, "salt": "live", "sticky": {"header": "X-User-Id"}, "routes": {"sentiment": route}}
        (root / "traffic.yaml").write_text(yaml.safe_dump(traffic))
        with running_router(root / "traffic.yaml", request_log=root / "router.db") as (router_url, _):
            watch_port = free_port()
            jobs = {"stillhouse-server": [server_url.removeprefix("http://")], "stillhouse-router": [router_url.removeprefix("http://")],
                    "stillhouse-watch": [f"127.0.0.1:{watch_port}"]}
            watch_metrics = RolloutMetrics()
            http_server, _ = start_http_server(watch_port, addr="127.0.0.1", registry=watch_metrics.registry)
            try:
                with running_prometheus(root, jobs) as prometheus:
                    watch = Watch(root / "traffic.yaml", "sentiment", PrometheusSource(prometheus), candidate="student",
                                  dry_run=True, metrics=watch_metrics)
                    answered = drive(router_url, server_url)
                    wait_until_scraped(prometheus, 'sum(stillhouse_router_requests_total{route="sentiment"})', sum(answered.values()))
                    watch.look()
                    wait_until_scraped(prometheus, 'count(stillhouse_rollout_verdict{route="sentiment"})', 4)  # the watch's look
                    time.sleep(3)  # a few evaluations of the rules
                    yield prometheus, answered
            finally:
                http_server.shutdown()


def drive(router_url: str, server_url: str) -> dict[str, int]:
    """Traffic and feedback through both arms, a dead arm that falls back, and one refused call on the server."""
    rng = random.Random(0)
    client = httpx.Client(timeout=60)
    answered: dict[str, int] = {}
    for i in range(40):
        response = client.post(f"{router_url}/generate", headers={"X-User-Id": f"user-{i}"},
                               json={"inputs": f"review {i}", "parameters": {"adapter_id": "sentiment", "max_new_tokens": 3}})
        assert response.status_code == 200, response.text
        arm = response.headers["x-stillhouse-arm"]
        answered[arm] = answered.get(arm, 0) + 1
        score = {"request_id": response.headers["x-request-id"], "metric": "correct", "value": rng.random() < 0.6}
        assert client.post(f"{router_url}/feedback", json=score).status_code == 200
    for i in range(3):  # pinned to the dead arm: the teacher answers as its fallback
        response = client.post(f"{router_url}/generate", headers={"X-User-Id": f"pinned-{i}", "x-stillhouse-arm": "broken"},
                               json={"inputs": "dead arm", "parameters": {"adapter_id": "sentiment", "max_new_tokens": 2}})
        assert response.status_code == 200 and response.headers["x-stillhouse-arm"] == "teacher"
        answered["teacher"] += 1
    with pytest.raises(lorax.errors.GenerationError):
        lorax.Client(server_url).generate("hello", adapter_id="no-such-adapter", max_new_tokens=2)
    assert set(answered) == {"teacher", "student"}
    return answered


def plausible(value: float, low: float, high: float) -> bool:
    return not math.isnan(value) and low - 1e-9 <= value <= high + 1e-9


@pytest.mark.parametrize(
    "panel,query",
    [pair for spec in dashboards.DASHBOARDS for pair in spec.queries()],
    ids=[f"{spec.uid}:{panel.title}:{query.legend}" for spec in dashboards.DASHBOARDS for panel, query in spec.queries()],
)
def test_every_panel_query_returns_labelled_plausible_series(live, panel, query):
    prometheus, _ = live
    result = prometheus.instant(substitute(query.expr))
    assert result.ok, f"{panel.title}: {result.status} {result.error or ''} for {substitute(query.expr)}"
    for series in result.series:
        assert set(query.labels) <= set(series.labels), f"{panel.title}: {series.labels} lacks {query.labels}"
        value = series.points[-1][1]
        assert plausible(value, query.low, query.high), f"{panel.title}: {value} outside [{query.low}, {query.high}] for {series.labels}"


def test_the_request_counts_are_what_was_sent(live):
    prometheus, answered = live
    panel = next(panel for panel in dashboards.ab_experiment.DASHBOARD.panels if panel.title == "Requests since start")
    result = prometheus.instant(substitute(panel.queries[0].expr))
    assert {series.labels["arm"]: series.points[-1][1] for series in result.series} == answered


@pytest.mark.parametrize("recording", rules.RECORDINGS, ids=lambda rule: rule.record)
def test_every_recording_rule_records_labelled_series(live, recording):
    prometheus, _ = live
    result = prometheus.instant(recording.record)
    assert result.ok, f"{recording.record} recorded nothing: {result.status}"
    for series in result.series:
        assert set(recording.labels) <= set(series.labels), series.labels
        assert not math.isinf(series.points[-1][1])


@pytest.mark.parametrize("alert", rules.ALERTS, ids=lambda rule: rule.alert)
def test_every_alert_measures_labelled_series_and_evaluates(live, alert):
    prometheus, _ = live
    measured = prometheus.instant(alert.base)
    assert measured.ok, f"{alert.alert}: its base query returned {measured.status} {measured.error or ''}"
    for series in measured.series:
        assert set(alert.labels) <= set(series.labels), series.labels
    assert prometheus.instant(alert.expr).status in ("ok", "empty")  # the full expression is valid PromQL
