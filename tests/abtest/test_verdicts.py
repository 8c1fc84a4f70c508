"""Verdicts end to end: a real router in front of upstreams with an injected effect, feedback through
POST /feedback, read back from a real Prometheus and from snapshots of the router's /metrics."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from prometheus_client import generate_latest

from abtest import analysis, config as traffic
from abtest.rollout import ADVANCE, HOLD, ROLLED_BACK, Watch
from monitoring.prometheus import PrometheusSource
from monitoring.snapshots import SnapshotStore
from tests.abtest.harness import running, running_router
from tests.abtest.labeller_upstream import LABELS, Labeller
from tests.monitoring.prometheus_harness import running_prometheus, wait_for_scrape_after, wait_until_scraped

CLIENT = httpx.Client(timeout=10)
ROUTED = 'sum(stillhouse_router_requests_total{route="sentiment"})'  # requests the router answered, as Prometheus last saw


def write_traffic(path, control_url, candidate_url, weights=(50, 50), **experiment):
    plan = {"primary": "correct", "guardrails": {"error_rate": {"max_absolute": 0.05}}, "min_samples_per_arm": 50,
            "mde": 0.1, **experiment}
    route = {
        "mode": "passthrough",
        "metrics": {"correct": {"type": "boolean", "goal": "maximize"}},
        "checks": {"valid_output": {"labels": list(LABELS)}},
        "arms": {"teacher": {"role": "control", "upstream": control_url, "weight": weights[0]},
                 "student": {"role": "candidate", "upstream": candidate_url, "adapter": "s@v1", "weight": weights[1]}},
        "experiment": plan,
    }
    path.write_text(yaml.safe_dump({"version": 1, "salt": "verdicts", "sticky": {"header": "X-User-Id"}, "routes": {"sentiment": route}}))
    return path


def send_traffic(url, requests: int, seed: int, feedback: bool = True) -> dict[str, int]:
    """``requests`` exchanges from distinct users, scored by the gold label unless ``feedback`` is off. Returns answers per arm."""
    rng = random.Random(seed)
    per_arm: dict[str, int] = {}
    for i in range(requests):
        gold = rng.choice(LABELS)
        body = {"inputs": f"review {i} gold={gold}", "parameters": {"adapter_id": "sentiment", "max_new_tokens": 2}}
        response = CLIENT.post(f"{url}/generate", json=body, headers={"X-User-Id": f"user-{seed}-{i}"})
        assert response.status_code == 200, response.text
        arm = response.headers["x-stillhouse-arm"]
        per_arm[arm] = per_arm.get(arm, 0) + 1
        if feedback:
            score = {"request_id": response.headers["x-request-id"], "metric": "correct",
                     "value": response.json()["generated_text"] == gold}
            assert CLIENT.post(f"{url}/feedback", json=score).status_code == 200
    return per_arm


@pytest.fixture()
def upstreams():
    teacher, student = Labeller(0.55, seed=1), Labeller(0.9, seed=2)
    with running(teacher.app()) as teacher_app, running(student.app()) as student_app:
        yield (teacher, teacher_app.url), (student, student_app.url)


def analyse(config_path, source, start, end) -> analysis.Analysis:
    result, _ = analysis.analyze_route(traffic.load(config_path), "sentiment", source, start, end)
    return result


def observed(tmp_path, url, requests: int, seed: int, feedback: bool = True) -> tuple[SnapshotStore, float, dict[str, int]]:
    """Traffic through the router at ``url`` between two snapshots of its /metrics: the store, the start, answers per arm."""
    store = SnapshotStore(tmp_path / "snapshots.jsonl")
    start = time.time()
    store.scrape(f"{url}/metrics")
    answered = send_traffic(url, requests, seed, feedback)
    store.scrape(f"{url}/metrics")
    return store, start, answered


def test_the_injected_effect_is_found_from_prometheus_and_from_snapshots(tmp_path, upstreams):
    (_, teacher_url), (_, student_url) = upstreams
    config_path = write_traffic(tmp_path / "traffic.yaml", teacher_url, student_url)
    with running_router(config_path) as (url, _):
        port = url.rsplit(":", 1)[1]
        with running_prometheus(tmp_path, [f"127.0.0.1:{port}"]) as prometheus:
            store = SnapshotStore(tmp_path / "snapshots.jsonl")
            start = time.time()
            store.scrape(f"{url}/metrics")
            wait_for_scrape_after(prometheus, start)
            answered = send_traffic(url, 400, seed=0)
            wait_until_scraped(prometheus, ROUTED, 400)
            store.scrape(f"{url}/metrics")
            end = time.time()
            from_prometheus = analyse(config_path, PrometheusSource(prometheus), start, end)
            from_snapshots = analyse(config_path, store, start, end)
            cli = subprocess.run(
                [sys.executable, "-m", "stillhouse", "abtest", "analyze", "--route", "sentiment", "--config", str(config_path),
                 "--prometheus", prometheus.url, "--window", "10m", "--json", "--html", str(tmp_path / "report.html")],
                capture_output=True, text=True, timeout=120,
            )
    assert from_prometheus.arms == from_snapshots.arms == answered
    for result in (from_prometheus, from_snapshots):
        assert result.srm.ok is True
        assert result.verdict == analysis.PROMOTE, result.reasons
        primary = result.metrics[0]
        assert primary.role == "primary" and primary.estimate > 0.2 and primary.always_valid_p_value < 0.05
    assert from_prometheus.metrics == from_snapshots.metrics
    assert cli.returncode == 0, cli.stderr
    report = json.loads(cli.stdout)
    assert {"route", "window", "arms", "srm", "metrics", "verdict", "reasons"} <= set(report)
    assert report["verdict"] == "promote" and report["arms"] == answered
    assert {"name", "role", "control", "candidate", "estimate", "ci", "p_value", "always_valid_p_value", "status"} <= set(report["metrics"][0])
    assert (tmp_path / "report.html").stat().st_size > 10_000


def test_an_a_a_test_does_not_promote(tmp_path):
    control, candidate = Labeller(0.7, seed=3), Labeller(0.7, seed=4)
    with running(control.app()) as control_app, running(candidate.app()) as candidate_app:
        config_path = write_traffic(tmp_path / "traffic.yaml", control_app.url, candidate_app.url)
        with running_router(config_path) as (url, _):
            store, start, _ = observed(tmp_path, url, 300, seed=1)
            result = analyse(config_path, store, start, time.time())
    assert result.srm.ok is True
    assert result.verdict in (analysis.CONTINUE, analysis.INCONCLUSIVE), result.reasons


def test_an_output_check_decides_before_any_feedback(tmp_path):
    control, candidate = Labeller(0.7, seed=5), Labeller(0.7, seed=6, garbage=0.3)
    with running(control.app()) as control_app, running(candidate.app()) as candidate_app:
        config_path = write_traffic(tmp_path / "traffic.yaml", control_app.url, candidate_app.url, primary="valid_output")
        with running_router(config_path) as (url, _):
            store, start, answered = observed(tmp_path, url, 300, seed=5, feedback=False)
            result = analyse(config_path, store, start, time.time())
    primary = result.metrics[0]
    assert primary.name == "valid_output" and primary.control == 1.0 and primary.candidate < 0.85
    assert result.verdict == analysis.ROLLBACK and "valid_output is worse" in result.reasons[0]
    assert sum(answered.values()) == 300


def test_a_broken_split_is_caught_and_stops_the_analysis(tmp_path, upstreams):
    (_, teacher_url), (_, student_url) = upstreams
    served = write_traffic(tmp_path / "served.yaml", teacher_url, student_url, weights=(80, 20))
    planned = write_traffic(tmp_path / "planned.yaml", teacher_url, student_url, weights=(50, 50))
    with running_router(served) as (url, _):
        store, start, _ = observed(tmp_path, url, 300, seed=2)
        result = analyse(planned, store, start, time.time())
    assert result.srm.ok is False and result.srm.p_value < 0.001
    assert result.verdict == analysis.ROLLBACK and "sample ratio mismatch" in result.reasons[0]


def test_watch_ramps_then_rolls_back_on_a_latency_breach(tmp_path, upstreams):
    (_, teacher_url), (student, student_url) = upstreams
    config_path = write_traffic(
        tmp_path / "traffic.yaml", teacher_url, student_url, weights=(100, 0), min_samples_per_arm=20,
        guardrails={"latency_p95": {"max_relative_increase": 1.0}}, ramp={"steps": [20, 50, 100], "min_minutes_per_step": 0},
    )
    log = tmp_path / "decisions.jsonl"
    with running_router(config_path) as (url, router), running_prometheus(tmp_path, [url.removeprefix("http://")]) as prometheus:
        watch = Watch(config_path, "sentiment", PrometheusSource(prometheus), decision_log=log)

        def at_weight(weight: float) -> None:
            """The router hot-reloaded the file the watch wrote, and Prometheus has scraped it: the step's traffic counts."""
            deadline = time.monotonic() + 30
            scraped = f'stillhouse_router_arm_weight{{route="sentiment",arm="student"}} == {weight}'
            while router.holder.config.routes["sentiment"].arms["student"].weight != weight or not prometheus.instant(scraped).ok:
                assert time.monotonic() < deadline, f"the router never served weight {weight}"
                time.sleep(0.1)

        assert watch.start().action == ADVANCE and watch.weight == 20
        at_weight(20)
        send_traffic(url, 250, seed=3)
        wait_until_scraped(prometheus, ROUTED, 250)
        decision = watch.look()
        assert decision.action == ADVANCE and watch.weight == 50, decision.reasons

        student.delay_s = 0.3  # the candidate gets slow: p95 far above twice the control's
        at_weight(50)
        send_traffic(url, 120, seed=4)
        wait_until_scraped(prometheus, ROUTED, 370)
        decision = watch.look()
        assert decision.action == ROLLED_BACK and watch.weight == 0
        assert any("latency_p95" in reason for reason in decision.reasons)
        at_weight(0)
    written = traffic.load(config_path)
    assert written.routes["sentiment"].arms["student"].weight == 0 and written.routes["sentiment"].arms["teacher"].weight == 100
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [entry["action"] for entry in entries] == [ADVANCE, ADVANCE, ROLLED_BACK]
    assert entries[-1]["analysis"]["verdict"] == "rollback" and entries[-1]["weight_before"] == 50
    assert HOLD not in [entry["action"] for entry in entries]
    exported = generate_latest(watch.metrics.registry).decode()
    assert 'stillhouse_rollout_decisions_total{action="advance",arm="student",route="sentiment"} 2.0' in exported
    assert 'stillhouse_rollout_verdict{arm="student",route="sentiment",verdict="rollback"} 1.0' in exported
    assert 'stillhouse_rollout_candidate_weight{arm="student",route="sentiment"} 0.0' in exported
