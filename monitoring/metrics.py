"""Metric names and label sets: the one place the server, the router and the dashboards agree on.

Every per-adapter series is labelled with the canonical registry id (``name@vN``) or
``BASE_ADAPTER_LABEL`` for the base model. Adapter ids come from the registry, so the label
set is bounded; never put a user or request id in a label.

Server metrics (``stillhouse serve``):

=============================================  =========  =====================  =========================================
name                                           type       labels                 meaning
=============================================  =========  =====================  =========================================
stillhouse_server_requests_total               counter    adapter, outcome       finished requests by outcome (OUTCOMES)
stillhouse_server_request_duration_seconds     histogram  adapter                arrival to last token
stillhouse_server_time_to_first_token_seconds  histogram  adapter                arrival to first generated token
stillhouse_server_prompt_tokens_total          counter    adapter                prompt tokens of successful requests
stillhouse_server_generated_tokens_total       counter    adapter                generated tokens of successful requests
stillhouse_server_queue_depth                  gauge      —                      requests waiting or running in the engine
stillhouse_server_resident_adapters            gauge      —                      adapters resident in the engine
stillhouse_server_adapter_load_seconds         histogram  adapter                time to make an adapter resident
=============================================  =========  =====================  =========================================

Request-log metrics (both ``stillhouse serve --request-log`` and ``stillhouse route``):

=============================================  =========  =====================  =========================================
stillhouse_request_log_dropped_rows_total      counter    component              rows dropped because the writer fell behind
=============================================  =========  =====================  =========================================

Router metrics (``stillhouse route``), per route x arm; ``arm`` is the arm that answered:

==============================================  =========  ======================  =========================================
stillhouse_router_requests_total                counter    route, arm, outcome     finished requests by ROUTER_OUTCOMES
stillhouse_router_request_duration_seconds      histogram  route, arm              arrival to the last byte relayed
stillhouse_router_time_to_first_token_seconds   histogram  route, arm              arrival to the first streamed chunk
stillhouse_router_prompt_tokens_total           counter    route, arm              prompt tokens (upstream-reported)
stillhouse_router_completion_tokens_total       counter    route, arm              generated tokens (upstream-reported)
stillhouse_router_upstream_errors_total         counter    route, arm, reason      failed calls (timeout, connect, 5xx, read, stream, circuit_open)
stillhouse_router_fallbacks_total               counter    route, arm, fallback    requests handed to ``fallback`` after ``arm`` failed
stillhouse_router_shadow_requests_total         counter    route, arm, agreement   shadow calls: agree, disagree, error, skipped
stillhouse_router_feedback_count_total          counter    route, arm, metric      feedback values received (n)
stillhouse_router_feedback_sum                  gauge      route, arm, metric      sum of feedback values (sum x; a gauge, as x may be negative)
stillhouse_router_feedback_sum_squares_total    counter    route, arm, metric      sum of squared feedback values (sum x^2)
stillhouse_router_config_info                   gauge      version                 1 for the loaded traffic-split version
stillhouse_router_config_reload_errors_total    counter    —                       traffic-split files refused on reload
==============================================  =========  ======================  =========================================

``route`` is ``__passthrough__`` for adapter ids that name no route (``arm`` is then ``__default__``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# `*_created` series double every counter's cardinality and no dashboard or query reads them.
disable_created_metrics()

BASE_ADAPTER_LABEL = "__base__"

#: outcome label values; they mirror LoRAX's ``error_type`` so one vocabulary serves logs and metrics
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

# Latency buckets from 5 ms to 2 min: CPU serving of small models spans that whole range.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """The inference server's Prometheus collectors, bound to one registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "stillhouse_server_requests", "Finished requests by adapter and outcome.", ["adapter", "outcome"], registry=r
        )
        self.request_duration = Histogram(
            "stillhouse_server_request_duration_seconds",
            "Time from arrival to the last token.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "stillhouse_server_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "stillhouse_server_prompt_tokens", "Prompt tokens of successful requests.", ["adapter"], registry=r
        )
        self.generated_tokens = Counter(
            "stillhouse_server_generated_tokens", "Generated tokens of successful requests.", ["adapter"], registry=r
        )
        self.queue_depth = Gauge("stillhouse_server_queue_depth", "Requests waiting or running in the engine.", registry=r)
        self.resident_adapters = Gauge(
            "stillhouse_server_resident_adapters", "Adapters resident in the engine.", registry=r
        )
        self.adapter_load = Histogram(
            "stillhouse_server_adapter_load_seconds",
            "Time to make an adapter resident.",
            ["adapter"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )

    def observe_request(
        self,
        adapter: str,
        outcome: str,
        *,
        duration_s: float | None = None,
        ttft_s: float | None = None,
        prompt_tokens: int = 0,
        generated_tokens: int = 0,
    ) -> None:
        """Record one finished request; latency and tokens only count for successes."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
        self.requests.labels(adapter, outcome).inc()
        if outcome != "success":
            return
        if duration_s is not None:
            self.request_duration.labels(adapter).observe(duration_s)
        if ttft_s is not None:
            self.time_to_first_token.labels(adapter).observe(ttft_s)
        self.prompt_tokens.labels(adapter).inc(prompt_tokens)
        self.generated_tokens.labels(adapter).inc(generated_tokens)


class RequestLogMetrics:
    """The request log's writer health, for whichever component owns a ``RequestLog``."""

    def __init__(self, registry: CollectorRegistry):
        self.dropped_rows = Counter(
            "stillhouse_request_log_dropped_rows",
            "Request-log rows dropped because the writer fell behind.",
            ["component"],
            registry=registry,
        )


PASSTHROUGH_ROUTE_LABEL = "__passthrough__"
DEFAULT_ARM_LABEL = "__default__"

#: router outcome label values
ROUTER_OUTCOMES = (
    "success",  # the assigned arm answered
    "fallback",  # the assigned arm failed and the fallback arm answered
    "client_error",  # the upstream refused the request (4xx), relayed as is
    "upstream_error",  # every arm tried failed; the client saw an error
    "cancelled",  # the client went away mid-stream
)


class RouterMetrics:
    """The A/B router's Prometheus collectors, bound to one registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        arm = ["route", "arm"]
        self.requests = Counter("stillhouse_router_requests", "Finished requests by route, arm and outcome.", [*arm, "outcome"], registry=r)
        self.request_duration = Histogram(
            "stillhouse_router_request_duration_seconds", "Arrival to the last byte relayed.", arm, buckets=LATENCY_BUCKETS, registry=r
        )
        self.time_to_first_token = Histogram(
            "stillhouse_router_time_to_first_token_seconds",
            "Arrival to the first streamed chunk (the whole answer when not streaming).",
            arm,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("stillhouse_router_prompt_tokens", "Prompt tokens reported by the upstream.", arm, registry=r)
        self.completion_tokens = Counter("stillhouse_router_completion_tokens", "Generated tokens reported by the upstream.", arm, registry=r)
        self.upstream_errors = Counter(
            "stillhouse_router_upstream_errors", "Failed upstream calls by reason.", [*arm, "reason"], registry=r
        )
        self.fallbacks = Counter(
            "stillhouse_router_fallbacks", "Requests a fallback arm answered for a failed arm.", [*arm, "fallback"], registry=r
        )
        self.shadow = Counter(
            "stillhouse_router_shadow_requests", "Shadow calls by agreement with the served answer.", [*arm, "agreement"], registry=r
        )
        self.feedback_count = Counter("stillhouse_router_feedback_count", "Feedback values received.", [*arm, "metric"], registry=r)
        # A gauge because float feedback may be negative; it still only accumulates.
        self.feedback_sum = Gauge("stillhouse_router_feedback_sum", "Sum of feedback values.", [*arm, "metric"], registry=r)
        self.feedback_sum_squares = Counter(
            "stillhouse_router_feedback_sum_squares", "Sum of squared feedback values.", [*arm, "metric"], registry=r
        )
        self.config_info = Gauge("stillhouse_router_config_info", "The loaded traffic-split version.", ["version"], registry=r)
        self.config_reload_errors = Counter(
            "stillhouse_router_config_reload_errors", "Traffic-split files refused on reload.", registry=r
        )
        self.request_log = RequestLogMetrics(r)

    def observe_request(
        self,
        route: str,
        arm: str,
        outcome: str,
        *,
        duration_s: float | None = None,
        ttft_s: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """Record one finished request; latency and tokens count for answered requests only."""
        if outcome not in ROUTER_OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {ROUTER_OUTCOMES}")
        self.requests.labels(route, arm, outcome).inc()
        if outcome not in ("success", "fallback"):
            return
        if duration_s is not None:
            self.request_duration.labels(route, arm).observe(duration_s)
        if ttft_s is not None:
            self.time_to_first_token.labels(route, arm).observe(ttft_s)
        if prompt_tokens:
            self.prompt_tokens.labels(route, arm).inc(prompt_tokens)
        if completion_tokens:
            self.completion_tokens.labels(route, arm).inc(completion_tokens)

    def observe_feedback(self, route: str, arm: str, metric: str, value: float) -> None:
        """Count, sum and sum of squares: the sufficient statistics a mean test needs."""
        self.feedback_count.labels(route, arm, metric).inc()
        self.feedback_sum.labels(route, arm, metric).inc(value)
        self.feedback_sum_squares.labels(route, arm, metric).inc(value * value)

    def set_config_version(self, version: str) -> None:
        """Export ``version`` as the only loaded config."""
        self.config_info.clear()
        self.config_info.labels(version).set(1)
