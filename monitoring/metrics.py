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
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
