"""Prometheus recording and alert rules, built from the metric catalog with the PromQL builders.

``stillhouse dashboards build`` writes them to ``monitoring/prometheus/rules/stillhouse.rules.yml``
(checked for staleness like the dashboards); ``promtool check rules`` validates the file and
``promtool test rules`` runs the unit tests in ``monitoring/prometheus/tests/`` against it. Each
alert keeps its ``base`` query (what is measured) apart from its ``condition`` (the threshold),
so the live test can check that the measured series exist even while nothing fires.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from monitoring import catalog, promql
from monitoring.promql import Regex

RULES_PATH = Path(__file__).parent / "prometheus" / "rules" / "stillhouse.rules.yml"
JOBS = ("stillhouse-server", "stillhouse-router", "stillhouse-watch")  # the scrape job names every Prometheus config uses


@dataclass(frozen=True)
class Recording:
    record: str
    expr: str
    labels: tuple[str, ...]  # label names of the recorded series


@dataclass(frozen=True)
class Alert:
    alert: str
    base: str  # what is measured
    condition: str  # appended to ``base``: the threshold that fires
    for_: str
    summary: str
    labels: tuple[str, ...]  # label names of the measured series
    severity: str = "warning"

    @property
    def expr(self) -> str:
        return f"{self.base} {self.condition}"


def _p95(spec, by: list[str]) -> str:
    return promql.quantile(0.95, spec, "5m", by=by)


REQUESTS_RATE = Recording("route_arm_outcome:stillhouse_router_requests:rate1m",
                          promql.rate(catalog.ROUTER_REQUESTS, "1m", by=["route", "arm", "outcome"]), ("route", "arm", "outcome"))
LATENCY_P95 = Recording("route_arm:stillhouse_router_request_duration_seconds:p95_5m",
                        _p95(catalog.ROUTER_REQUEST_DURATION, ["route", "arm"]), ("route", "arm"))
TTFT_P95 = Recording("route_arm:stillhouse_router_time_to_first_token_seconds:p95_5m",
                     _p95(catalog.ROUTER_TIME_TO_FIRST_TOKEN, ["route", "arm"]), ("route", "arm"))
_ERRORS = promql.rate(catalog.ROUTER_UPSTREAM_ERRORS, "5m", by=["route", "arm"])
# Failed calls over all calls to the arm's upstream; an arm whose every call failed has no answered
# requests, so the missing side counts as zero (`or ... * 0`) instead of dropping the arm.
UPSTREAM_ERROR_RATIO = Recording(
    "route_arm:stillhouse_router_upstream_error_ratio:rate5m",
    promql.ratio(_ERRORS, f"{_ERRORS} + ({promql.rate(catalog.ROUTER_REQUESTS, '5m', by=['route', 'arm'])} or {_ERRORS} * 0)"),
    ("route", "arm"),
)
_FEEDBACK = promql.sufficient_stats(catalog.ROUTER_FEEDBACK, "1h", by=["route", "arm", "metric"])
FEEDBACK_MEAN = Recording("route_arm_metric:stillhouse_router_feedback_mean:1h",
                          promql.ratio(_FEEDBACK["sum"], _FEEDBACK["n"]), ("route", "arm", "metric"))
SERVER_REQUESTS_RATE = Recording("adapter_outcome:stillhouse_server_requests:rate1m",
                                 promql.rate(catalog.SERVER_REQUESTS, "1m", by=["adapter", "outcome"]), ("adapter", "outcome"))
SERVER_LATENCY_P95 = Recording("adapter:stillhouse_server_request_duration_seconds:p95_5m",
                               _p95(catalog.SERVER_REQUEST_DURATION, ["adapter"]), ("adapter",))
RECORDINGS = (REQUESTS_RATE, LATENCY_P95, TTFT_P95, UPSTREAM_ERROR_RATIO, FEEDBACK_MEAN, SERVER_REQUESTS_RATE, SERVER_LATENCY_P95)


def _by_role(recorded: str, role: str) -> str:
    """A per-(route, arm) recorded series, kept only for arms of ``role`` that get traffic."""
    return f"({recorded} and on (route, arm) {promql.selector(catalog.ROUTER_ARM_WEIGHT, role=role)} > 0)"


ALERTS = (
    Alert("StillhouseTargetDown", f'up{{job=~"{"|".join(JOBS)}"}}', "== 0", "1m",
          "{{ $labels.job }} at {{ $labels.instance }} does not answer its /metrics scrape", ("job", "instance"), "critical"),
    Alert("StillhouseUpstreamErrors", UPSTREAM_ERROR_RATIO.record, "> 0.05", "5m",
          "more than 5% of calls to the upstream of {{ $labels.route }}/{{ $labels.arm }} fail", ("route", "arm")),
    Alert("StillhouseRouterFallingBack", promql.rate(catalog.ROUTER_FALLBACKS, "5m", by=["route", "arm", "fallback"]), "> 0", "2m",
          "{{ $labels.route }}: requests for {{ $labels.arm }} are answered by {{ $labels.fallback }}", ("route", "arm", "fallback")),
    Alert("StillhouseRequestLogDropping", promql.increase(catalog.REQUEST_LOG_DROPPED_ROWS, "5m", by=["component"]), "> 0", "0m",
          "the {{ $labels.component }}'s request log drops rows: its writer falls behind", ("component",)),
    Alert("StillhouseSampleRatioMismatch", promql.selector(catalog.ROLLOUT_SRM_P_VALUE), "< 0.001", "0m",
          "{{ $labels.route }}: the split does not match the weights (SRM p < 0.001); no comparison can be trusted",
          ("route", "arm"), "critical"),
    Alert("StillhouseGuardrailLatency", _by_role(LATENCY_P95.record, "candidate"),
          f"> on (route) group_left () 1.5 * max by (route) {_by_role(LATENCY_P95.record, 'control')}", "5m",
          "{{ $labels.route }}/{{ $labels.arm }}: p95 latency above 1.5x the control's", ("route", "arm")),
    Alert("StillhouseRolloutRolledBack", promql.increase(catalog.ROLLOUT_DECISIONS, "15m", by=["route", "arm"], action="rollback"), "> 0",
          "0m", "{{ $labels.route }}: the watch rolled {{ $labels.arm }} back; see its decision log", ("route", "arm"), "critical"),
)


def rules_yaml() -> str:
    """The rules file Prometheus loads (``rule_files``)."""
    groups = [
        {"name": "stillhouse-recording", "rules": [{"record": rule.record, "expr": rule.expr} for rule in RECORDINGS]},
        {"name": "stillhouse-alerts", "rules": [
            {"alert": alert.alert, "expr": alert.expr, "for": alert.for_, "labels": {"severity": alert.severity},
             "annotations": {"summary": alert.summary}}
            for alert in ALERTS
        ]},
    ]
    header = "# Generated by `stillhouse dashboards build` from monitoring/rules.py; do not edit by hand.\n"
    return header + yaml.safe_dump({"groups": groups}, sort_keys=False, width=200)
