"""The watch's decision rule, as a pure function of one look's analysis."""

from __future__ import annotations

from abtest import analysis
from abtest.rollout import ADVANCE, HOLD, PROMOTED, ROLLED_BACK, decide
from abtest.stats.srm import SrmCheck

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
