"""The watch's decision rule, as a pure function of one look's analysis."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from abtest import analysis
from abtest.rollout import ADVANCE, HOLD, PROMOTED, ROLLED_BACK, Watch, decide
from abtest.stats.srm import SrmCheck
from monitoring.prometheus import QueryResult
from monitoring.series import Series
from stillhouse import main

STEPS = [1, 5, 25, 50, 100]


def look(verdict: str, guardrails: dict[str, str] | None = None) -> analysis.Analysis:
    rows = [analysis.MetricResult("correct", "primary", "ok")]
    rows += [analysis.MetricResult(name, "guardrail", status) for name, status in (guardrails or {}).items()]
    srm = SrmCheck("ok", 0.5, True, {}, {})
    return analysis.Analysis("r", "teacher", "student", (0, 60), {}, srm, rows, None, None, verdict, [f"verdict {verdict}"])


def test_a_rollback_verdict_rolls_back_at_once_even_before_the_step_is_held():
    decision = decide(look(analysis.ROLLBACK), STEPS, 25, held_minutes=0.1, min_minutes=10)
    assert (decision.action, decision.weight, decision.final) == (ROLLED_BACK, 0.0, True)


def test_a_step_is_held_its_minimum_time_and_until_every_guardrail_holds():
    assert decide(look(analysis.CONTINUE), STEPS, 5, held_minutes=3, min_minutes=10).action == HOLD
    held = decide(look(analysis.CONTINUE, {"latency_p95": "not_enough_data"}), STEPS, 5, held_minutes=12, min_minutes=10)
    assert held.action == HOLD and "latency_p95" in held.reasons[0]


def test_the_ramp_advances_while_guardrails_hold_whatever_the_primary_says_so_far():
    decision = decide(look(analysis.CONTINUE, {"latency_p95": "pass"}), STEPS, 5, held_minutes=12, min_minutes=10)
    assert (decision.action, decision.weight) == (ADVANCE, 25)


def test_full_traffic_is_the_promotion_and_needs_a_promote_verdict():
    waiting = decide(look(analysis.CONTINUE, {"latency_p95": "pass"}), STEPS, 50, held_minutes=12, min_minutes=10)
    assert (waiting.action, waiting.weight) == (HOLD, 50) and "replaces the control" in waiting.reasons[0]
    promoted = decide(look(analysis.PROMOTE, {"latency_p95": "pass"}), STEPS, 50, held_minutes=12, min_minutes=10)
    assert (promoted.action, promoted.weight, promoted.final) == (PROMOTED, 100, True)


def test_a_ramp_that_stops_below_full_traffic_promotes_at_its_last_step():
    assert decide(look(analysis.CONTINUE), [1, 10], 10, held_minutes=12, min_minutes=10).action == HOLD
    assert decide(look(analysis.PROMOTE), [1, 10], 10, held_minutes=12, min_minutes=10).action == PROMOTED


class FixedSource:
    """Weight series as a range query returns them: one per router replica."""

    def __init__(self, *replicas: list[tuple[float, float]]):
        self.result = QueryResult("ok", [Series("stillhouse_router_arm_weight", {"instance": str(i)}, tuple(points))
                                         for i, points in enumerate(replicas)])

    def read(self, *args, **kwargs):
        return self.result


def test_a_step_starts_when_every_live_replica_serves_its_weight(tmp_path):
    traffic = {"version": 1, "salt": "s", "routes": {"r": {
        "metrics": {"correct": {"type": "boolean"}}, "experiment": {"primary": "correct"},
        "arms": {"c": {"role": "control", "upstream": "http://127.0.0.1:1", "weight": 50},
                 "s": {"role": "candidate", "upstream": "http://127.0.0.1:2", "weight": 50}}}}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(traffic))
    watch = Watch(tmp_path / "t.yaml", "r", FixedSource(), clock=lambda: 100.0)
    assert watch.share == 50
    watch.source = FixedSource([(100, 10), (101, 10), (102, 50), (103, 50)], [(100, 10), (101, 50), (102, 50), (103, 50)])
    assert watch._served_since(103)[0] == 102  # the slower replica decides
    watch.source = FixedSource([(100, 10), (101, 10), (102, 10), (103, 10)], [(100, 50), (101, 50), (102, 50), (103, 50)])
    since, waiting = watch._served_since(103)
    assert since is None and "waiting until the router serves 50%" in waiting
    watch.source = FixedSource([(100, 50), (101, 50)], [(100, 10), (101, 10), (102, 50), (103, 50)])  # a replica gone before 102
    assert watch._served_since(103)[0] == 102


def test_the_watch_command_logs_each_look_and_never_writes_in_a_dry_run(tmp_path, capsys):
    example = Path(__file__).resolve().parents[2] / "abtest" / "examples" / "traffic.yaml"
    before = example.read_text()
    log = tmp_path / "decisions.jsonl"
    code = main(["abtest", "watch", "--route", "sentiment", "--config", str(example), "--metrics-url", "http://127.0.0.1:1",
                 "--state", str(tmp_path / "state.jsonl"), "--decision-log", str(log), "--dry-run", "--max-looks", "1",
                 "--interval", "0", "--candidate", "student-v1"])
    assert code == 0 and example.read_text() == before
    assert [json.loads(line)["action"] for line in log.read_text().splitlines()] == [HOLD, HOLD]
    captured = capsys.readouterr()
    assert "hold: student-v1 at 50%" in captured.out and "did not answer" in captured.err
