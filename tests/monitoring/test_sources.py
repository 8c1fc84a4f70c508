"""Window counts: exact counter arithmetic, and the same numbers from Prometheus and from snapshots."""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import start_http_server

from abtest import analysis
from abtest.experiment import Experiment
from monitoring.catalog import ROUTER_REQUESTS
from monitoring.metrics import RouterMetrics
from monitoring.prometheus import Prometheus, PrometheusSource
from monitoring.series import Series, counter_increase, quantile_from_buckets, window_increase
from monitoring.snapshots import SnapshotStore
from serving.loopback import free_port
from tests.monitoring.prometheus_harness import running_prometheus, wait_for_scrape_after, wait_until_scraped


def test_counter_increase_handles_resets_and_series_born_in_the_window():
    assert counter_increase([(0, 5), (1, 8), (2, 8), (3, 11)], start=0) == 6
    assert counter_increase([(0, 5), (1, 9), (2, 2), (3, 4)], start=0) == 4 + 2 + 2  # reset after 9
    assert counter_increase([(5, 3), (6, 4)], start=0) == 4  # first seen after the start: counts from zero
    assert counter_increase([], start=0) == 0
    grouped = window_increase([Series("x_total", {"arm": "a"}, ((0, 1), (9, 4))), Series("x_total", {"arm": "a"}, ((3, 2),)),
                               Series("x_total", {"arm": "b"}, ((0, 7), (9, 7)))], start=0, by=("arm",))
    assert grouped == {("a",): 5, ("b",): 0}


def test_quantiles_from_buckets_interpolate_like_histogram_quantile():
    buckets = {0.1: 10, 0.5: 30, 1.0: 40, float("inf"): 40}
    assert quantile_from_buckets(buckets, 0.5) == pytest.approx(0.1 + 0.4 * (20 - 10) / 20)
    assert quantile_from_buckets({1.0: 0, float("inf"): 0}, 0.9) is None
    assert quantile_from_buckets({1.0: 5, float("inf"): 10}, 0.95) == 1.0


def test_an_unreachable_prometheus_is_a_status_not_a_crash():
    result = Prometheus(f"http://127.0.0.1:{free_port()}", timeout_s=1).instant("up")
    assert result.status == "unreachable" and "did not answer" in result.error


def test_prometheus_and_snapshots_give_the_same_counts_and_verdict(tmp_path):
    metrics = RouterMetrics()
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    store = SnapshotStore(tmp_path / "snapshots.jsonl")
    url = f"http://127.0.0.1:{port}/metrics"
    rng = np.random.default_rng(4)
    try:
        with running_prometheus(tmp_path, [f"127.0.0.1:{port}"]) as client:
            start = time.time()
            assert store.scrape(url) is None
            wait_for_scrape_after(client, start)
            sent = {"teacher": 0, "student": 0}
            for _ in range(6):
                for arm, rate in (("teacher", 0.5), ("student", 0.8)):
                    for _ in range(40):
                        sent[arm] += 1
                        metrics.observe_request("sentiment", arm, "success", duration_s=0.2, ttft_s=0.1, prompt_tokens=10,
                                                generated_tokens=2)
                        metrics.observe_feedback("sentiment", arm, "correct", float(rng.random() < rate))
                time.sleep(1.2)
                assert store.scrape(url) is None
            wait_until_scraped(client, f'sum({ROUTER_REQUESTS.name}{{route="sentiment"}})', sum(sent.values()))
            assert store.scrape(url) is None
            end = time.time()
            plan = Experiment(primary="correct", min_samples_per_arm=50)
            declarations = {"correct": analysis.MetricDeclaration("boolean")}
            results = {}
            for name, source in (("prometheus", PrometheusSource(client)), ("snapshots", store)):
                window = analysis.read_window(source, "sentiment", start, end)
                assert window.errors == []
                arms = analysis.summarise(window, ["teacher", "student"])
                assert {arm: stats.assigned for arm, stats in arms.items()} == sent, name
                results[name] = analysis.analyze("sentiment", plan, declarations, {"teacher": 50, "student": 50},
                                                 "teacher", "student", arms, (start, end))
    finally:
        server.shutdown()
    prom, snap = results["prometheus"], results["snapshots"]
    assert prom.verdict == snap.verdict == analysis.PROMOTE
    assert prom.metrics[0] == snap.metrics[0] and prom.arms == snap.arms


def test_api_times_round_down_so_the_point_at_a_windows_end_stays_inside_it():
    from monitoring.prometheus import api_time

    assert api_time(1796157888.144972) == "1796157888.144"  # to the nearest it would be .145, past the end
    assert api_time(1796157888.0) == "1796157888.000"
    assert float(api_time(1796157888.9999)) <= 1796157888.9999
