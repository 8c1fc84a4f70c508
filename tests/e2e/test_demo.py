"""`stillhouse demo --quick`: every stage of the loop runs for real (server, router, Prometheus, training) and
its summary holds each stage's figures; SIGTERM mid-run stops every child and leaves no port bound."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import yaml

from monitoring import catalog
from serving.registry import Registry
from tests.binaries import PROMETHEUS_PACKAGE, require


def demo(state_dir) -> list[str]:
    return [sys.executable, "-m", "stillhouse", "demo", "--quick", "--state-dir", str(state_dir)]


def bound(port: int) -> bool:
    """Something still listens on the port (closed connections in TIME_WAIT do not count)."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def ports_of(state_dir) -> list[int]:
    """The server, router and Prometheus ports the run used (from its traffic file and Prometheus config)."""
    traffic = yaml.safe_load((state_dir / "traffic.yaml").read_text())
    server = int(traffic["routes"]["sentiment"]["arms"]["teacher"]["upstream"].rsplit(":", 1)[1])
    scraped = yaml.safe_load((state_dir / "prometheus.yml").read_text())["scrape_configs"]
    targets = [int(target.rsplit(":", 1)[1]) for job in scraped for group in job["static_configs"] for target in group["targets"]]
    return sorted({server, *targets})


def test_the_quick_demo_runs_every_stage_and_summarises_it(tmp_path):
    require("prometheus", PROMETHEUS_PACKAGE)
    state = tmp_path / "demo"
    result = subprocess.run(demo(state), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in range(1, 6):
        assert f"[{stage}/5]" in result.stderr
    summary = json.loads((state / "summary.json").read_text())

    # 1-2: the teacher's traffic from both clients, scored, read back from the request log
    traffic = summary["teacher_traffic"]
    assert traffic == {"requests": 64, "failed": 0, "scored": 32, "clients": ["lorax", "openai"]}
    assert summary["rows_logged"] == 64
    # 3: curation counts chain step to step; a registered, servable student; both scored on gold
    steps = summary["curation"]
    assert [step["step"] for step in steps] == ["rule_filter", "near_dedup", "split", "balance"]
    assert steps[0]["rows_in"] == 64 and all(a["rows_out"] == b["rows_in"] for a, b in zip(steps, steps[1:]))
    assert summary["rows_after_curation"]["train"] > 0
    adapter = summary["adapter"]
    assert adapter["id"] == "sentiment-student@v1" and adapter["profile"] == "strict" and adapter["train_steps"] == 8
    assert Registry(state / "registry").resolve("sentiment-student").id == adapter["id"]
    teacher, student = summary["evaluation"]["teacher"], summary["evaluation"]["student"]
    assert teacher["rows"] == student["rows"] == 24 and teacher["failed_requests"] == student["failed_requests"] == 0
    assert teacher["prompt_tokens_per_request"] > 5 * student["prompt_tokens_per_request"]
    assert {"accuracy", "macro_f1"} <= set(student["metrics"])
    # 4: both arms served live traffic with feedback joined; the watch started the ramp
    arms = summary["arms"]
    assert set(arms) == {"teacher", "student"}
    for figures in arms.values():
        assert figures["requests"] > 0 and figures["feedback"] > 0 and figures["errors"] == 0
        assert figures["latency_p50_ms"] <= figures["latency_p95_ms"]
    assert arms["teacher"]["prompt_tokens_per_request"] > 5 * arms["student"]["prompt_tokens_per_request"]
    assert summary["ab_traffic"]["failed"] == 0
    decisions = summary["decisions"]
    assert decisions[0] == {"action": "advance", "weight": 50.0, "reasons": ["rollout starts at the first step, 50%"]}
    assert all(decision["action"] in catalog.ROLLOUT_ACTIONS for decision in decisions)
    assert len(decisions) >= 2  # at least one look after the start
    # 5: a verdict with reasons, from Prometheus; the report and the dashboards
    assert summary["metrics_source"] == "Prometheus"
    assert summary["verdict"]["verdict"] in catalog.VERDICTS and summary["verdict"]["reasons"]
    assert summary["srm"]["observed"] and summary["primary"]["metric"] == "correct"
    assert "<html" in (state / "report.html").read_text().lower()
    assert {path.rsplit("/", 1)[1] for path in summary["dashboards"]} == {"stillhouse-ab-experiment.json", "stillhouse-serving.json"}
    assert "verdict:" in result.stdout and str(state / "report.html") in result.stdout
    assert not any(bound(port) for port in ports_of(state))


def test_sigterm_stops_every_child_and_frees_every_port(tmp_path):
    require("prometheus", PROMETHEUS_PACKAGE)
    state = tmp_path / "demo"
    process = subprocess.Popen(demo(state), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any("[2/5]" in line for line in lines):
            line = process.stderr.readline()
            assert line, f"the demo ended before its second stage:\n{''.join(lines)}"
            lines.append(line)
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, "".join(lines) + rest
    assert "every process it started is stopped" in rest
    assert not any(bound(port) for port in ports_of(state))
