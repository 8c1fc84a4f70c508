"""The serving dashboard: the inference server per adapter (requests, latency, errors, adapters, queue)."""

from __future__ import annotations

from monitoring import catalog, promql
from monitoring.dashboards.panel import Dashboard, Panel, Query
from monitoring.promql import Regex

RATE = "$__rate_interval"
FAILURES = Regex("|".join(outcome for outcome in catalog.OUTCOMES if outcome != "success"))


def _quantiles(spec) -> tuple[Query, ...]:
    return tuple(Query(promql.quantile(q, spec, RATE, by=["adapter"]), f"{{{{adapter}}}} p{round(q * 100)}", ("adapter",))
                 for q in (0.5, 0.95))


DASHBOARD = Dashboard(
    uid="stillhouse-serving",
    title="Stillhouse: serving",
    description="The inference server: per-adapter traffic, latency and errors, resident adapters and the queue.",
    panels=(
        Panel("Engine", "The engine, base model and servability profile of each server (1 per server).", "none", (
            Query(promql.instant(catalog.SERVER_INFO, by=["engine", "model", "profile"]), "{{engine}} {{model}} ({{profile}})",
                  ("engine", "model", "profile"), 1, float("inf"), instant=True),
        ), kind="stat", width=8, height=4),
        Panel("Queue depth", "Requests waiting or running in the engine (429 above --max-queue).", "short", (
            Query(promql.instant(catalog.SERVER_QUEUE_DEPTH, aggregation="max"), "queue", (), instant=True),
        ), kind="stat", width=8, height=4),
        Panel("Resident adapters", "Adapters loaded in the engine (LRU beyond --max-active-adapters).", "short", (
            Query(promql.instant(catalog.SERVER_RESIDENT_ADAPTERS, aggregation="max"), "resident", (), instant=True),
        ), kind="stat", width=8, height=4),
        Panel("Requests per adapter", "Successful requests per second by adapter (canonical id; __base__ is the base model).", "reqps", (
            Query(promql.rate(catalog.SERVER_REQUESTS, RATE, by=["adapter"], outcome="success"), "{{adapter}}", ("adapter",)),
        )),
        Panel("Errors by type", "Refused or failed requests per second by adapter and outcome (the LoRAX error type).", "reqps", (
            Query(promql.rate(catalog.SERVER_REQUESTS, RATE, by=["adapter", "outcome"], outcome=FAILURES), "{{adapter}} {{outcome}}",
                  ("adapter", "outcome")),
        )),
        Panel("Latency p50 / p95", "Arrival to the last token, per adapter.", "s", _quantiles(catalog.SERVER_REQUEST_DURATION)),
        Panel("Time to first token p50 / p95", "Arrival to the first generated token, per adapter.", "s",
              _quantiles(catalog.SERVER_TIME_TO_FIRST_TOKEN)),
        Panel("Generated tokens per second", "Output throughput per adapter.", "short", (
            Query(promql.rate(catalog.SERVER_GENERATED_TOKENS, RATE, by=["adapter"]), "{{adapter}}", ("adapter",)),
        )),
        Panel("Adapter loads and evictions", "Loads and LRU evictions per second, and each adapter's mean load time since start.",
              "short", (
            Query(promql.rate(catalog.SERVER_ADAPTER_LOAD, RATE, by=["adapter"]), "{{adapter}} loads/s", ("adapter",)),
            Query(promql.rate(catalog.SERVER_ADAPTER_EVICTIONS, RATE, by=["adapter"]), "{{adapter}} evictions/s", ("adapter",)),
            # Loads are rare: a windowed quantile is empty most of the time, the cumulative mean is not.
            Query(promql.ratio(promql.instant(catalog.SERVER_ADAPTER_LOAD, by=["adapter"], series="sum"),
                               promql.instant(catalog.SERVER_ADAPTER_LOAD, by=["adapter"], series="count")),
                  "{{adapter}} mean load s", ("adapter",)),
        )),
        Panel("Request-log rows dropped", "Rows the request-log writer dropped because it fell behind (should stay 0).", "short", (
            Query(promql.rate(catalog.REQUEST_LOG_DROPPED_ROWS, RATE, by=["component"]), "{{component}}", ("component",)),
        ), width=24),
    ),
)
