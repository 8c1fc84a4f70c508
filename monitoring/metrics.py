"""The prometheus-client collectors of the server and the router, built from ``monitoring.catalog``.

Names, kinds, labels and help come from the catalog only; this module binds them to a registry
and records observations. See ``docs/metrics.md`` for the table of every series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from monitoring import catalog
from monitoring.catalog import Kind, MetricSpec

# `*_created` series double every counter's cardinality and no dashboard or query reads them.
disable_created_metrics()


def collector(spec: MetricSpec, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    """The prometheus-client collector of one catalog entry, registered in ``registry``."""
    if spec.kind is Kind.COUNTER:
        return Counter(spec.family, spec.help, spec.labels, registry=registry)
    if spec.kind is Kind.GAUGE:
        return Gauge(spec.family, spec.help, spec.labels, registry=registry)
    return Histogram(spec.family, spec.help, spec.labels, buckets=spec.buckets, registry=registry)


class ServerMetrics:
    """The inference server's Prometheus collectors, bound to one registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = collector(catalog.SERVER_REQUESTS, r)
        self.request_duration = collector(catalog.SERVER_REQUEST_DURATION, r)
        self.time_to_first_token = collector(catalog.SERVER_TIME_TO_FIRST_TOKEN, r)
        self.prompt_tokens = collector(catalog.SERVER_PROMPT_TOKENS, r)
        self.generated_tokens = collector(catalog.SERVER_GENERATED_TOKENS, r)
        self.queue_depth = collector(catalog.SERVER_QUEUE_DEPTH, r)
        self.resident_adapters = collector(catalog.SERVER_RESIDENT_ADAPTERS, r)
        self.adapter_load = collector(catalog.SERVER_ADAPTER_LOAD, r)

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
        catalog.SERVER_REQUESTS.check_value("outcome", outcome)
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
        self.dropped_rows = collector(catalog.REQUEST_LOG_DROPPED_ROWS, registry)


class RouterMetrics:
    """The A/B router's Prometheus collectors, bound to one registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = collector(catalog.ROUTER_REQUESTS, r)
        self.request_duration = collector(catalog.ROUTER_REQUEST_DURATION, r)
        self.time_to_first_token = collector(catalog.ROUTER_TIME_TO_FIRST_TOKEN, r)
        self.prompt_tokens = collector(catalog.ROUTER_PROMPT_TOKENS, r)
        self.generated_tokens = collector(catalog.ROUTER_GENERATED_TOKENS, r)
        self.upstream_errors = collector(catalog.ROUTER_UPSTREAM_ERRORS, r)
        self.fallbacks = collector(catalog.ROUTER_FALLBACKS, r)
        self.shadow = collector(catalog.ROUTER_SHADOW_REQUESTS, r)
        feedback = catalog.ROUTER_FEEDBACK
        self.feedback_count = collector(feedback.count, r)
        self.feedback_sum_positive = collector(feedback.sum_positive, r)
        self.feedback_sum_negative = collector(feedback.sum_negative, r)
        self.feedback_sum_squares = collector(feedback.sum_squares, r)
        self.config_info = collector(catalog.ROUTER_CONFIG_INFO, r)
        self.config_reload_errors = collector(catalog.ROUTER_CONFIG_RELOAD_ERRORS, r)
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
        generated_tokens: int | None = None,
    ) -> None:
        """Record one finished request; latency and tokens count for answered requests only."""
        catalog.ROUTER_REQUESTS.check_value("outcome", outcome)
        self.requests.labels(route, arm, outcome).inc()
        if outcome not in catalog.ANSWERED_ROUTER_OUTCOMES:
            return
        if duration_s is not None:
            self.request_duration.labels(route, arm).observe(duration_s)
        if ttft_s is not None:
            self.time_to_first_token.labels(route, arm).observe(ttft_s)
        if prompt_tokens:
            self.prompt_tokens.labels(route, arm).inc(prompt_tokens)
        if generated_tokens:
            self.generated_tokens.labels(route, arm).inc(generated_tokens)

    def observe_feedback(self, route: str, arm: str, metric: str, value: float) -> None:
        """Count, sum (as positive and negative parts) and sum of squares: what a test of means needs."""
        labels = (route, arm, metric)
        self.feedback_count.labels(*labels).inc()
        # Both parts are always exported, so `positive - negative` never misses a series.
        self.feedback_sum_positive.labels(*labels).inc(max(value, 0.0))
        self.feedback_sum_negative.labels(*labels).inc(max(-value, 0.0))
        self.feedback_sum_squares.labels(*labels).inc(value * value)

    def set_config_version(self, version: str) -> None:
        """Export ``version`` as the only loaded config."""
        self.config_info.clear()
        self.config_info.labels(version).set(1)
