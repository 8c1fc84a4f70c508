"""PromQL builders: the kind of each series decides which functions apply; typos fail at build time."""

from __future__ import annotations

import pytest

from monitoring import catalog, promql
from monitoring.promql import Regex


def test_counter_increase_and_rate_are_summed_by_the_given_labels():
    assert promql.increase(catalog.ROUTER_REQUESTS, "1h", by=["route", "arm"], route="sentiment") == (
        'sum by (route, arm) (increase(stillhouse_router_requests_total{route="sentiment"}[1h]))'
    )
    assert promql.rate(catalog.SERVER_REQUESTS, "$__rate_interval", outcome=Regex("success|validation")) == (
        'sum (rate(stillhouse_server_requests_total{outcome=~"success|validation"}[$__rate_interval]))'
    )


def test_histograms_default_to_their_count_and_quantiles_keep_le():
    assert promql.rate(catalog.ROUTER_REQUEST_DURATION, "5m", by=["arm"]) == (
        "sum by (arm) (rate(stillhouse_router_request_duration_seconds_count[5m]))"
    )
    assert promql.quantile(0.95, catalog.ROUTER_REQUEST_DURATION, "5m", by=["arm"], route="$route") == (
        'histogram_quantile(0.95, sum by (arm, le) (rate(stillhouse_router_request_duration_seconds_bucket{route="$route"}[5m])))'
    )
    with pytest.raises(ValueError, match="pick series"):
        promql.selector(catalog.ROUTER_REQUEST_DURATION)
    with pytest.raises(TypeError, match="histogram"):
        promql.quantile(0.5, catalog.ROUTER_REQUESTS, "5m")
    with pytest.raises(ValueError, match="between 0 and 1"):
        promql.quantile(95, catalog.ROUTER_REQUEST_DURATION, "5m")


def test_gauges_refuse_window_functions_and_read_instantly():
    with pytest.raises(TypeError, match="gauge"):
        promql.rate(catalog.SERVER_QUEUE_DEPTH, "5m")
    with pytest.raises(TypeError, match="gauge"):
        promql.increase(catalog.ROUTER_CONFIG_INFO, "5m")
    assert promql.instant(catalog.SERVER_QUEUE_DEPTH, aggregation="max") == "max (stillhouse_server_queue_depth)"
    assert promql.instant(catalog.ROUTER_CONFIG_INFO, by=["version"]) == "sum by (version) (stillhouse_router_config_info)"


def test_typos_in_labels_and_values_fail_when_the_query_is_built():
    with pytest.raises(ValueError, match="no label 'rout'"):
        promql.selector(catalog.ROUTER_REQUESTS, rout="x")
    with pytest.raises(ValueError, match="not one of"):
        promql.selector(catalog.ROUTER_REQUESTS, outcome="succes")
    with pytest.raises(ValueError, match="not one of"):
        promql.selector(catalog.ROUTER_REQUESTS, outcome=Regex("success|falback"))
    with pytest.raises(ValueError, match="aggregate by"):
        promql.increase(catalog.ROUTER_REQUESTS, "1h", by=["adapter"])
    assert promql.selector(catalog.ROUTER_REQUESTS, outcome="$outcome") == 'stillhouse_router_requests_total{outcome="$outcome"}'


def test_raw_series_for_exact_window_counts():
    assert promql.raw(catalog.ROUTER_REQUESTS, route="r") == 'stillhouse_router_requests_total{route="r"}'
    assert promql.raw(catalog.ROUTER_TIME_TO_FIRST_TOKEN) == "stillhouse_router_time_to_first_token_seconds_count"


def test_sufficient_stats_take_the_sum_as_positive_minus_negative():
    queries = promql.sufficient_stats(catalog.ROUTER_FEEDBACK, "1h", by=["arm"], route="r", metric="correct")
    assert set(queries) == {"n", "sum", "sum_squares"}
    assert queries["n"] == 'sum by (arm) (increase(stillhouse_router_feedback_count_total{route="r",metric="correct"}[1h]))'
    assert queries["sum"] == (
        'sum by (arm) (increase(stillhouse_router_feedback_sum_positive_total{route="r",metric="correct"}[1h]))'
        ' - sum by (arm) (increase(stillhouse_router_feedback_sum_negative_total{route="r",metric="correct"}[1h]))'
    )
    assert promql.ratio("a", "b") == "(a) / (b)"
