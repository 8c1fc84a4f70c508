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
        self.adapter_evictions = collector(catalog.SERVER_ADAPTER_EVICTIONS, r)
        self.info = collector(catalog.SERVER_INFO, r)

    def set_info(self, engine: str, model: str, profile: str) -> None:
        """Export what this server runs: dashboards show it beside the numbers."""
        self.info.clear()
        self.info.labels(engine, model, profile).set(1)

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
        self.sanitised_rows = collector(catalog.REQUEST_LOG_SANITISED_ROWS, registry)

    def hooks(self, component: str) -> dict:
        """The ``RequestLog`` callbacks that count ``component``'s dropped and sanitised rows."""
        return {"on_drop": self.dropped_rows.labels(component).inc, "on_sanitise": self.sanitised_rows.labels(component).inc}


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
        self.output_checks = [collector(spec, r) for spec in catalog.ROUTER_OUTPUT_CHECKS.specs]
        self.arm_weight = collector(catalog.ROUTER_ARM_WEIGHT, r)
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

    def observe_check(self, route: str, arm: str, check: str, passed: bool) -> None:
        """One answer's output check, in the same count / sum / sum-of-squares shape as feedback."""
        count, positive, negative, squares = (family.labels(route, arm, check) for family in self.output_checks)
        count.inc()
        positive.inc(float(passed))
        negative.inc(0.0)
        squares.inc(float(passed))

    def set_config(self, version: str, arms: dict[str, dict[str, tuple[str, float]]]) -> None:
        """Export ``version`` as the only loaded config, and each arm's role and weight (percent of its route)."""
        self.config_info.clear()
        self.config_info.labels(version).set(1)
        self.arm_weight.clear()
        for route, by_arm in arms.items():
            total = sum(weight for _, weight in by_arm.values()) or 1.0
            for arm, (role, weight) in by_arm.items():
                catalog.ROUTER_ARM_WEIGHT.check_value("role", role)
                self.arm_weight.labels(route, arm, role).set(100.0 * weight / total)


    def initialise_route(self, route: str, arms: list[str], fallback: str | None, shadows: list[str],
                         metrics: list[str], checks: list[str]) -> None:
        """Create every series a route can have at 0, so the first event already shows in ``rate()``.

        prometheus-client creates a labelled series at its first increment, and a series whose first
        sample is already 1 never shows that increment in a windowed function.
        """
        for arm in arms:
            for outcome in catalog.ROUTER_OUTCOMES:
                self.requests.labels(route, arm, outcome)
            for reason in catalog.UPSTREAM_ERROR_REASONS:
                self.upstream_errors.labels(route, arm, reason)
            if fallback is not None and arm != fallback:
                self.fallbacks.labels(route, arm, fallback)
            for metric in metrics:
                self.feedback_count.labels(route, arm, metric)
                self.feedback_sum_positive.labels(route, arm, metric)
                self.feedback_sum_negative.labels(route, arm, metric)
                self.feedback_sum_squares.labels(route, arm, metric)
            for check in checks:
                for family in self.output_checks:
                    family.labels(route, arm, check)
        for arm in shadows:
            for agreement in catalog.SHADOW_AGREEMENTS:
                self.shadow.labels(route, arm, agreement)


class RolloutMetrics:
    """What `stillhouse abtest watch` decided and saw, for dashboards and alerts."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.decisions = collector(catalog.ROLLOUT_DECISIONS, self.registry)
        self.verdict = collector(catalog.ROLLOUT_VERDICT, self.registry)
        self.weight = collector(catalog.ROLLOUT_WEIGHT, self.registry)
        self.srm_p_value = collector(catalog.ROLLOUT_SRM_P_VALUE, self.registry)
        self.primary_p_value = collector(catalog.ROLLOUT_PRIMARY_P_VALUE, self.registry)

    def observe_decision(self, route: str, arm: str, action: str, weight: float, verdict: str | None = None,
                         srm_p_value: float | None = None, primary_p_value: float | None = None) -> None:
        """One decision of the watch, with the look's verdict and p-values when it analysed traffic."""
        catalog.ROLLOUT_DECISIONS.check_value("action", action)
        for known in catalog.ROLLOUT_ACTIONS:  # every action's series exists from the first decision on, at 0 until taken
            self.decisions.labels(route, arm, known)
        self.decisions.labels(route, arm, action).inc()
        self.weight.labels(route, arm).set(weight)
        if verdict is not None:
            for name in catalog.VERDICTS:
                self.verdict.labels(route, arm, name).set(1.0 if name == verdict else 0.0)
        if srm_p_value is not None:
            self.srm_p_value.labels(route, arm).set(srm_p_value)
        if primary_p_value is not None:
            self.primary_p_value.labels(route, arm).set(primary_p_value)
