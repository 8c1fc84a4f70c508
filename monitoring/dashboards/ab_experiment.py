"""The A/B experiment dashboard: one route, its control and one candidate arm, side by side.

Template variables: ``route``, ``control`` (the route's control arm) and ``candidate``. The
outcome metrics are drawn from their count / sum / sum-of-squares counters over the dashboard's
range, with a normal 95% interval; the verdict and the SRM and primary p-values come from
`stillhouse abtest watch` (its ``--metrics-port``), the split from the router's loaded config.
"""

from __future__ import annotations

from monitoring import catalog, promql
from monitoring.catalog import SufficientStats
from monitoring.dashboards.panel import Dashboard, Panel, Query, Variable
from monitoring.promql import Regex

ROUTE = {"route": "$route"}
ARMS = {"route": "$route", "arm": Regex("$control|$candidate")}
CANDIDATE = {"route": "$route", "arm": "$candidate"}
RATE = "$__rate_interval"
RANGE = "$__range"
ANSWERED = Regex("|".join(catalog.ANSWERED_ROUTER_OUTCOMES))


def _estimate_queries(group: SufficientStats, label: str) -> tuple[Query, ...]:
    """Mean per arm and its 95% interval from n, sum and sum of squares over the dashboard's range."""
    stats = promql.sufficient_stats(group, RANGE, by=["arm", label], **ARMS)
    n, total, squares = f"({stats['n']})", f"({stats['sum']})", f"({stats['sum_squares']})"
    mean = f"{total} / {n}"
    half = f"1.96 * sqrt(clamp_min({squares} - {total} ^ 2 / {n}, 0) / clamp_min({n} - 1, 1) / {n})"
    labels = ("arm", label)
    return (
        Query(mean, f"{{{{arm}}}} {{{{{label}}}}}", labels, low=float("-inf")),
        Query(f"{mean} - {half}", f"{{{{arm}}}} {{{{{label}}}}} low", labels, low=float("-inf")),
        Query(f"{mean} + {half}", f"{{{{arm}}}} {{{{{label}}}}} high", labels, low=float("-inf")),
    )


def _per_request(spec) -> str:
    return promql.ratio(promql.rate(spec, RATE, by=["arm"], **ARMS), promql.rate(catalog.ROUTER_REQUESTS, RATE, by=["arm"], outcome=ANSWERED, **ARMS))


def _quantiles(spec) -> tuple[Query, ...]:
    return tuple(Query(promql.quantile(q, spec, RATE, by=["arm"], **ARMS), f"{{{{arm}}}} p{round(q * 100)}", ("arm",))
                 for q in (0.5, 0.95))


requests_by_arm = promql.rate(catalog.ROUTER_REQUESTS, RATE, by=["arm"], **ROUTE)

DASHBOARD = Dashboard(
    uid="stillhouse-ab-experiment",
    title="Stillhouse: A/B experiment",
    description="A route's control and candidate arm: split, outcome metrics with intervals, guardrails and the verdict.",
    variables=(
        Variable("route", "Route", f"{catalog.ROUTER_REQUESTS.name}, route"),
        Variable("control", "Control arm", f'{promql.selector(catalog.ROUTER_ARM_WEIGHT, route="$route", role="control")}, arm'),
        Variable("candidate", "Candidate arm", f'{promql.selector(catalog.ROUTER_ARM_WEIGHT, route="$route", role="candidate")}, arm'),
    ),
    panels=(
        Panel("Verdict", "The latest verdict of `stillhouse abtest watch` on the candidate (1 = current).", "none", (
            Query(f"{promql.selector(catalog.ROLLOUT_VERDICT, **CANDIDATE)} == 1", "{{verdict}}", ("verdict",), 1, 1, instant=True),
        ), kind="stat", width=6, height=4),
        Panel("Candidate weight", "The candidate's share of the route's traffic as the watch last set it.", "percent", (
            Query(promql.selector(catalog.ROLLOUT_WEIGHT, **CANDIDATE), "{{arm}}", ("arm",), 0, 100, instant=True),
        ), kind="stat", width=6, height=4),
        Panel("SRM p-value", "Chi-square p-value of the actual split against the weights; below 0.001 the split is broken.", "none", (
            Query(promql.selector(catalog.ROLLOUT_SRM_P_VALUE, **CANDIDATE), "SRM p", ("arm",), 0, 1, instant=True),
        ), kind="stat", width=6, height=4),
        Panel("Primary metric: always-valid p-value", "mSPRT p-value of the plan's primary metric; safe to read at any time.", "none", (
            Query(promql.selector(catalog.ROLLOUT_PRIMARY_P_VALUE, **CANDIDATE), "always-valid p", ("arm",), 0, 1, instant=True),
        ), kind="stat", width=6, height=4),
        Panel("Configured and actual split", "Each arm's configured weight against its share of the requests.", "percentunit", (
            Query(f"{promql.instant(catalog.ROUTER_ARM_WEIGHT, by=['arm'], **ROUTE)} / 100", "{{arm}} configured", ("arm",), 0, 1),
            Query(f"{requests_by_arm} / scalar({promql.rate(catalog.ROUTER_REQUESTS, RATE, **ROUTE)})", "{{arm}} actual", ("arm",), 0, 1),
        )),
        Panel("Requests per arm", "Finished requests per second by the arm that answered and the outcome.", "reqps", (
            Query(promql.rate(catalog.ROUTER_REQUESTS, RATE, by=["arm", "outcome"], **ARMS), "{{arm}} {{outcome}}", ("arm", "outcome")),
        )),
        Panel("Requests since start", "Requests each arm answered since the router started (raw counters: exact).", "short", (
            Query(promql.instant(catalog.ROUTER_REQUESTS, by=["arm"], **ARMS), "{{arm}}", ("arm",), instant=True),
        ), kind="stat"),
        Panel("Feedback metrics per arm", "Mean feedback per arm over the range, with its 95% interval (n, sum, sum of squares).", "short",
              _estimate_queries(catalog.ROUTER_FEEDBACK, "metric")),
        Panel("Output checks per arm", "Share of answers passing each online output check over the range, with its 95% interval.",
              "percentunit", _estimate_queries(catalog.ROUTER_OUTPUT_CHECKS, "check")),
        Panel("Errors and fallbacks", "Failed upstream calls by reason, and requests the fallback arm answered.", "reqps", (
            Query(promql.rate(catalog.ROUTER_UPSTREAM_ERRORS, RATE, by=["arm", "reason"], **ROUTE), "{{arm}} {{reason}}", ("arm", "reason")),
            Query(promql.rate(catalog.ROUTER_FALLBACKS, RATE, by=["arm", "fallback"], **ROUTE), "{{arm}} -> {{fallback}}", ("arm", "fallback")),
        )),
        Panel("Latency p50 / p95", "Arrival to the last byte relayed, per arm.", "s", _quantiles(catalog.ROUTER_REQUEST_DURATION)),
        Panel("Time to first token p50 / p95", "Arrival to the first streamed chunk, per arm.", "s", _quantiles(catalog.ROUTER_TIME_TO_FIRST_TOKEN)),
        Panel("Prompt tokens per request", "The student's point: fewer prompt tokens than the few-shot teacher.", "short", (
            Query(_per_request(catalog.ROUTER_PROMPT_TOKENS), "{{arm}}", ("arm",)),
        )),
        Panel("Generated tokens per request", "Tokens each arm generates per answered request.", "short", (
            Query(_per_request(catalog.ROUTER_GENERATED_TOKENS), "{{arm}}", ("arm",)),
        )),
        Panel("Shadow agreement", "Shadow calls per second by agreement with the served answer.", "reqps", (
            Query(promql.rate(catalog.ROUTER_SHADOW_REQUESTS, RATE, by=["arm", "agreement"], **ROUTE), "{{arm}} {{agreement}}",
                  ("arm", "agreement")),
        ), width=24),
    ),
)
