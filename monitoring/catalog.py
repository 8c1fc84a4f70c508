"""The metric catalog: every series the server and the router export, defined once.

Each metric is a frozen ``MetricSpec``: the exported name, its kind, its label names, the values a
bounded label may take, and its help text. ``monitoring.metrics`` builds the prometheus-client
collectors from these specs, ``monitoring.promql`` builds queries from them, and
``docs/metrics.md`` is generated from them (``python -m monitoring.catalog``; a test keeps it
current). A name that is not in this module is not a Stillhouse metric.

Label rules: per-adapter series carry the canonical registry id (``name@vN``),
``BASE_ADAPTER_LABEL`` or ``UNKNOWN_ADAPTER_LABEL``; router series carry the route and the arm
that answered. Adapter ids, routes and arms come from the registry and the traffic-split file, so
label sets stay bounded: never put a user or request id in a label.

Outcome metrics that a test compares between arms are exported as a ``SufficientStats`` group
(count, sum, sum of squares), since Prometheus keeps aggregates only: that is all a two-sample test
of means needs. Counters cannot go down, so the sum of a metric whose values may be negative is
split into its positive and negative parts: ``sum = sum_positive - sum_negative``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from enum import Enum


class Kind(str, Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric family.

    ``name`` is the name a query uses: counters end in ``_total``; a histogram's name is its
    family, queried as ``<name>_bucket``, ``<name>_count`` and ``<name>_sum``.
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    label_values: dict[str, tuple[str, ...]] = field(default_factory=dict)  # bounded labels and their values
    buckets: tuple[float, ...] | None = None
    component: str = ""  # which process exports it: server, router, or both (request log)

    def __post_init__(self) -> None:
        if (self.kind is Kind.COUNTER) != self.name.endswith("_total"):
            raise ValueError(f"{self.name}: counters, and only counters, end in _total")
        if (self.kind is Kind.HISTOGRAM) != (self.buckets is not None):
            raise ValueError(f"{self.name}: histograms, and only histograms, have buckets")
        unknown = set(self.label_values) - set(self.labels)
        if unknown:
            raise ValueError(f"{self.name}: label_values for labels it does not have: {sorted(unknown)}")

    @property
    def family(self) -> str:
        """The name prometheus-client is given (it appends ``_total`` to counters itself)."""
        return self.name.removesuffix("_total")

    @property
    def windowable(self) -> bool:
        """Whether ``rate()`` / ``increase()`` apply: counters and histogram series only accumulate."""
        return self.kind is not Kind.GAUGE

    def check_value(self, label: str, value: str) -> None:
        """Refuse a value outside a bounded label's vocabulary (a typo would open a new series)."""
        allowed = self.label_values.get(label)
        if allowed is not None and value not in allowed:
            raise ValueError(f"{self.name}: {label}={value!r} is not one of {allowed}")


@dataclass(frozen=True)
class SufficientStats:
    """The count / sum / sum-of-squares counters of one outcome metric, per route x arm x metric."""

    count: MetricSpec
    sum_positive: MetricSpec
    sum_negative: MetricSpec
    sum_squares: MetricSpec

    @property
    def specs(self) -> tuple[MetricSpec, ...]:
        return (self.count, self.sum_positive, self.sum_negative, self.sum_squares)


# --- label values --------------------------------------------------------------------------

BASE_ADAPTER_LABEL = "__base__"
UNKNOWN_ADAPTER_LABEL = "__unknown__"  # requests refused before their adapter was known
PASSTHROUGH_ROUTE_LABEL = "__passthrough__"  # adapter ids that name no route
DEFAULT_ARM_LABEL = "__default__"  # the arm of a passthrough request

#: server outcomes; they mirror LoRAX's ``error_type`` so one vocabulary serves logs and metrics
OUTCOMES = (
    "success",
    "validation",  # bad parameters or prompt too long (422)
    "not_found",  # unknown adapter (424)
    "not_servable",  # adapter fails the servability check (424)
    "overloaded",  # queue full (429)
    "generation",  # the engine failed (424)
    "incomplete",  # stopped early, e.g. at shutdown (500)
    "cancelled",  # the client went away mid-stream
)

#: router outcomes
ROUTER_OUTCOMES = (
    "success",  # the assigned arm answered
    "fallback",  # the assigned arm failed and the fallback arm answered
    "client_error",  # the upstream refused the request (4xx), relayed as is
    "upstream_error",  # every arm tried failed; the client saw an error
    "cancelled",  # the client went away mid-stream
)
#: outcomes that mean the client got an answer (latency and tokens are recorded for these only)
ANSWERED_ROUTER_OUTCOMES = ("success", "fallback")

#: why an upstream call failed; "stream": before the first byte (the fallback may still answer),
#: "cut": after it (the client got an error event in place of the rest)
UPSTREAM_ERROR_REASONS = ("timeout", "connect", "5xx", "read", "stream", "cut", "circuit_open")
SHADOW_AGREEMENTS = ("agree", "disagree", "error", "skipped")
REQUEST_LOG_COMPONENTS = ("server", "router")

# Latency buckets from 5 ms to 2 min: CPU serving of small models spans that whole range.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# --- server --------------------------------------------------------------------------------

_SERVER = {"component": "server"}
SERVER_REQUESTS = MetricSpec(
    "stillhouse_server_requests_total", Kind.COUNTER, "Finished requests by adapter and outcome.",
    ("adapter", "outcome"), {"outcome": OUTCOMES}, **_SERVER,
)
SERVER_REQUEST_DURATION = MetricSpec(
    "stillhouse_server_request_duration_seconds", Kind.HISTOGRAM, "Time from arrival to the last token (successes).",
    ("adapter",), buckets=LATENCY_BUCKETS, **_SERVER,
)
SERVER_TIME_TO_FIRST_TOKEN = MetricSpec(
    "stillhouse_server_time_to_first_token_seconds", Kind.HISTOGRAM, "Time from arrival to the first generated token (successes).",
    ("adapter",), buckets=LATENCY_BUCKETS, **_SERVER,
)
SERVER_PROMPT_TOKENS = MetricSpec(
    "stillhouse_server_prompt_tokens_total", Kind.COUNTER, "Prompt tokens of successful requests.", ("adapter",), **_SERVER,
)
SERVER_GENERATED_TOKENS = MetricSpec(
    "stillhouse_server_generated_tokens_total", Kind.COUNTER, "Generated tokens of successful requests.", ("adapter",), **_SERVER,
)
SERVER_QUEUE_DEPTH = MetricSpec(
    "stillhouse_server_queue_depth", Kind.GAUGE, "Requests waiting or running in the engine.", **_SERVER,
)
SERVER_RESIDENT_ADAPTERS = MetricSpec(
    "stillhouse_server_resident_adapters", Kind.GAUGE, "Adapters resident in the engine.", **_SERVER,
)
SERVER_ADAPTER_EVICTIONS = MetricSpec(
    "stillhouse_server_adapter_evictions_total", Kind.COUNTER, "Adapters dropped from the engine to make room (LRU), not unloaded on request.",
    ("adapter",), **_SERVER,
)
SERVER_INFO = MetricSpec(
    "stillhouse_server_info", Kind.GAUGE, "1, labelled with the engine in use, the base model and the servability profile.",
    ("engine", "model", "profile"), **_SERVER,
)
SERVER_ADAPTER_LOAD = MetricSpec(
    "stillhouse_server_adapter_load_seconds", Kind.HISTOGRAM, "Time to make an adapter resident.",
    ("adapter",), buckets=LOAD_BUCKETS, **_SERVER,
)

# --- request log (both components) ---------------------------------------------------------

REQUEST_LOG_DROPPED_ROWS = MetricSpec(
    "stillhouse_request_log_dropped_rows_total", Kind.COUNTER,
    "Request-log rows dropped: the writer fell behind, the store refused a batch (e.g. the database is down), "
    "or it refused one row on its own (the rest of its batch is stored).",
    ("component",), {"component": REQUEST_LOG_COMPONENTS}, component="server, router",
)
REQUEST_LOG_SANITISED_ROWS = MetricSpec(
    "stillhouse_request_log_sanitised_rows_total", Kind.COUNTER,
    "Request-log rows stored with text no store can hold (lone UTF-16 surrogates) replaced by U+FFFD.",
    ("component",), {"component": REQUEST_LOG_COMPONENTS}, component="server, router",
)
REQUEST_LOG_METRICS = (REQUEST_LOG_DROPPED_ROWS, REQUEST_LOG_SANITISED_ROWS)

# --- router --------------------------------------------------------------------------------

_ROUTER = {"component": "router"}
_ARM = ("route", "arm")
ROUTER_REQUESTS = MetricSpec(
    "stillhouse_router_requests_total", Kind.COUNTER, "Finished requests by route, answering arm and outcome.",
    (*_ARM, "outcome"), {"outcome": ROUTER_OUTCOMES}, **_ROUTER,
)
ROUTER_REQUEST_DURATION = MetricSpec(
    "stillhouse_router_request_duration_seconds", Kind.HISTOGRAM, "Arrival to the last byte relayed (answered requests).",
    _ARM, buckets=LATENCY_BUCKETS, **_ROUTER,
)
ROUTER_TIME_TO_FIRST_TOKEN = MetricSpec(
    "stillhouse_router_time_to_first_token_seconds", Kind.HISTOGRAM,
    "Arrival to the first streamed chunk (the whole answer when not streaming).", _ARM, buckets=LATENCY_BUCKETS, **_ROUTER,
)
ROUTER_PROMPT_TOKENS = MetricSpec(
    "stillhouse_router_prompt_tokens_total", Kind.COUNTER, "Prompt tokens reported by the upstream.", _ARM, **_ROUTER,
)
ROUTER_GENERATED_TOKENS = MetricSpec(
    "stillhouse_router_generated_tokens_total", Kind.COUNTER, "Generated tokens reported by the upstream.", _ARM, **_ROUTER,
)
ROUTER_UPSTREAM_ERRORS = MetricSpec(
    "stillhouse_router_upstream_errors_total", Kind.COUNTER, "Failed upstream calls by reason.",
    (*_ARM, "reason"), {"reason": UPSTREAM_ERROR_REASONS}, **_ROUTER,
)
ROUTER_FALLBACKS = MetricSpec(
    "stillhouse_router_fallbacks_total", Kind.COUNTER, "Requests the fallback arm answered after the arm failed.",
    (*_ARM, "fallback"), **_ROUTER,
)
ROUTER_SHADOW_REQUESTS = MetricSpec(
    "stillhouse_router_shadow_requests_total", Kind.COUNTER, "Shadow calls by agreement with the served answer.",
    (*_ARM, "agreement"), {"agreement": SHADOW_AGREEMENTS}, **_ROUTER,
)


def _outcome_stats(family: str, label: str, what: str) -> SufficientStats:
    """The four counters of one outcome metric family, per route x arm x ``label``."""
    labels = (*_ARM, label)
    return SufficientStats(
        count=MetricSpec(f"{family}_count_total", Kind.COUNTER, f"{what}: observations (n).", labels, **_ROUTER),
        sum_positive=MetricSpec(f"{family}_sum_positive_total", Kind.COUNTER,
                                f"{what}: sum of the positive values (sum x = positive - negative).", labels, **_ROUTER),
        sum_negative=MetricSpec(f"{family}_sum_negative_total", Kind.COUNTER,
                                f"{what}: sum of the magnitudes of the negative values.", labels, **_ROUTER),
        sum_squares=MetricSpec(f"{family}_sum_squares_total", Kind.COUNTER, f"{what}: sum of squared values (sum x^2).", labels, **_ROUTER),
    )


ROUTER_FEEDBACK = _outcome_stats("stillhouse_router_feedback", "metric", "Feedback values sent to POST /feedback")
ROUTER_OUTPUT_CHECKS = _outcome_stats("stillhouse_router_output_check", "check", "Output checks of answers (1 passed, 0 failed)")
ROUTER_CONFIG_INFO = MetricSpec(
    "stillhouse_router_config_info", Kind.GAUGE, "1 for the loaded traffic-split version.", ("version",), **_ROUTER,
)
ARM_ROLES = ("control", "candidate")
ROUTER_ARM_WEIGHT = MetricSpec(
    "stillhouse_router_arm_weight", Kind.GAUGE, "Configured weight of each arm, as a percent of its route's traffic.",
    (*_ARM, "role"), {"role": ARM_ROLES}, **_ROUTER,
)
ROUTER_CONFIG_RELOAD_ERRORS = MetricSpec(
    "stillhouse_router_config_reload_errors_total", Kind.COUNTER, "Traffic-split files refused on reload.", **_ROUTER,
)

# --- rollout (`stillhouse abtest watch --metrics-port`) -------------------------------------

ROLLOUT_ACTIONS = ("advance", "hold", "rollback", "promoted")
VERDICTS = ("promote", "rollback", "continue", "inconclusive")
_ROLLOUT = {"component": "watch"}
ROLLOUT_DECISIONS = MetricSpec(
    "stillhouse_rollout_decisions_total", Kind.COUNTER, "Decisions of the rollout watch, by action.",
    ("route", "arm", "action"), {"action": ROLLOUT_ACTIONS}, **_ROLLOUT,
)
ROLLOUT_VERDICT = MetricSpec(
    "stillhouse_rollout_verdict", Kind.GAUGE, "1 for the latest verdict on the candidate arm, 0 for the others.",
    ("route", "arm", "verdict"), {"verdict": VERDICTS}, **_ROLLOUT,
)
ROLLOUT_WEIGHT = MetricSpec(
    "stillhouse_rollout_candidate_weight", Kind.GAUGE, "The candidate's weight the watch last set, percent.", ("route", "arm"), **_ROLLOUT,
)
ROLLOUT_SRM_P_VALUE = MetricSpec(
    "stillhouse_rollout_srm_p_value", Kind.GAUGE, "Chi-square p-value of the split at the watch's latest look (below 0.001: mismatch).",
    ("route", "arm"), **_ROLLOUT,
)
ROLLOUT_PRIMARY_P_VALUE = MetricSpec(
    "stillhouse_rollout_primary_p_value", Kind.GAUGE, "Always-valid p-value of the primary metric at the watch's latest look.",
    ("route", "arm"), **_ROLLOUT,
)

SERVER_METRICS = (
    SERVER_REQUESTS, SERVER_REQUEST_DURATION, SERVER_TIME_TO_FIRST_TOKEN, SERVER_PROMPT_TOKENS, SERVER_GENERATED_TOKENS,
    SERVER_QUEUE_DEPTH, SERVER_RESIDENT_ADAPTERS, SERVER_ADAPTER_LOAD, SERVER_ADAPTER_EVICTIONS, SERVER_INFO,
)
ROUTER_METRICS = (
    ROUTER_REQUESTS, ROUTER_REQUEST_DURATION, ROUTER_TIME_TO_FIRST_TOKEN, ROUTER_PROMPT_TOKENS, ROUTER_GENERATED_TOKENS,
    ROUTER_UPSTREAM_ERRORS, ROUTER_FALLBACKS, ROUTER_SHADOW_REQUESTS, *ROUTER_FEEDBACK.specs, *ROUTER_OUTPUT_CHECKS.specs, ROUTER_ARM_WEIGHT, ROUTER_CONFIG_INFO,
    ROUTER_CONFIG_RELOAD_ERRORS,
)
ROLLOUT_METRICS = (ROLLOUT_DECISIONS, ROLLOUT_VERDICT, ROLLOUT_WEIGHT, ROLLOUT_SRM_P_VALUE, ROLLOUT_PRIMARY_P_VALUE)
#: every metric, in the order the documentation lists them
ALL_METRICS = (*SERVER_METRICS, *REQUEST_LOG_METRICS, *ROUTER_METRICS, *ROLLOUT_METRICS)
BY_NAME = {spec.name: spec for spec in ALL_METRICS}


def markdown_table() -> str:
    """``docs/metrics.md``: one row per metric, generated so the documentation cannot drift."""
    lines = [
        "# Metrics",
        "",
        "Generated from `monitoring/catalog.py` by `python -m monitoring.catalog`; do not edit by hand.",
        "Counters end in `_total`; a histogram is queried as `<name>_bucket`, `<name>_count` and `<name>_sum`.",
        "",
        "| name | type | labels | exported by | meaning |",
        "|---|---|---|---|---|",
    ]
    for spec in ALL_METRICS:
        labels = ", ".join(
            f"{label} ({' / '.join(spec.label_values[label])})" if label in spec.label_values else label for label in spec.labels
        )
        lines.append(f"| `{spec.name}` | {spec.kind.value} | {labels or '—'} | {spec.component} | {spec.help} |")
    lines += [
        "",
        f"Label values: `{BASE_ADAPTER_LABEL}` is the base model, `{UNKNOWN_ADAPTER_LABEL}` a request refused before its adapter",
        f"was known; `route` is `{PASSTHROUGH_ROUTE_LABEL}` for adapter ids that name no route (`arm` is then `{DEFAULT_ARM_LABEL}`).",
        "Feedback (per route x arm x metric) and output checks (per route x arm x check) are exported as count, sum",
        "(positive part minus negative part) and sum of squares: the sufficient statistics of a two-sample test of means.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
