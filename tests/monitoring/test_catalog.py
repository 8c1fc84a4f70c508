"""The metric catalog is the only source of names: collectors, docs and the README agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import generate_latest

from monitoring import catalog
from monitoring.catalog import Kind, MetricSpec
from monitoring.metrics import RolloutMetrics, RouterMetrics, ServerMetrics

ROOT = Path(__file__).resolve().parents[2]


def exported(registry) -> dict[str, tuple[str, set[str]]]:
    """Family name as queried -> (type, label names seen on its samples)."""
    families = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = {key for sample in family.samples for key in sample.labels} - {"le"}
        families[name] = (family.type, labels, family.documentation)
    return families


def assert_exports_exactly(registry, specs) -> None:
    """The registry's families are ``specs``: same names, kinds, label names and help."""
    families = exported(registry)
    assert set(families) == {spec.name for spec in specs}
    for spec in specs:
        assert families[spec.name] == (spec.kind.value, set(spec.labels), spec.help), spec.name


def test_server_collectors_are_exactly_the_catalog():
    metrics = ServerMetrics()
    metrics.observe_request("a@v1", "success", duration_s=0.1, ttft_s=0.05, prompt_tokens=3, generated_tokens=2)
    metrics.adapter_load.labels("a@v1").observe(0.2)
    metrics.queue_depth.set(1)
    metrics.resident_adapters.set(1)
    metrics.set_info("TorchEngine", "tiny", "strict")
    metrics.adapter_evictions.labels("a@v1").inc()
    assert_exports_exactly(metrics.registry, catalog.SERVER_METRICS)


def test_router_collectors_are_exactly_the_catalog():
    metrics = RouterMetrics()
    metrics.observe_request("r", "a", "success", duration_s=0.1, ttft_s=0.05, prompt_tokens=3, generated_tokens=2)
    metrics.upstream_errors.labels("r", "a", "timeout").inc()
    metrics.fallbacks.labels("r", "a", "b").inc()
    metrics.shadow.labels("r", "a", "agree").inc()
    metrics.observe_feedback("r", "a", "correct", 1.0)
    metrics.observe_check("r", "a", "valid_output", True)
    metrics.set_config("abc", {"r": {"a": ("control", 3), "b": ("candidate", 1)}})
    metrics.config_reload_errors.inc()
    metrics.request_log.dropped_rows.labels("router").inc()
    metrics.request_log.sanitised_rows.labels("router").inc()
    assert_exports_exactly(metrics.registry, [*catalog.ROUTER_METRICS, *catalog.REQUEST_LOG_METRICS])


def test_rollout_collectors_are_exactly_the_catalog():
    metrics = RolloutMetrics()
    metrics.observe_decision("r", "a", "advance", 5.0, "continue", srm_p_value=0.4, primary_p_value=0.2)
    assert_exports_exactly(metrics.registry, catalog.ROLLOUT_METRICS)


def test_configured_weights_are_exported_as_percents():
    metrics = RouterMetrics()
    metrics.set_config("v1", {"r": {"a": ("control", 3), "b": ("candidate", 1)}})
    text = generate_latest(metrics.registry).decode()
    assert 'stillhouse_router_arm_weight{arm="a",role="control",route="r"} 75.0' in text and 'stillhouse_router_config_info{version="v1"} 1.0' in text


def test_feedback_sum_splits_signs_so_every_series_only_grows():
    metrics = RouterMetrics()
    for value in (2.0, -3.0, 0.5):
        metrics.observe_feedback("r", "a", "reward", value)
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for sample in family.samples
        if sample.name.startswith("stillhouse_router_feedback")
    }
    group = catalog.ROUTER_FEEDBACK
    assert samples[group.count.name] == 3
    assert samples[group.sum_positive.name] - samples[group.sum_negative.name] == pytest.approx(-0.5)
    assert samples[group.sum_squares.name] == pytest.approx(4 + 9 + 0.25)
    assert all(spec.kind is Kind.COUNTER for spec in group.specs)


def test_bounded_labels_refuse_values_outside_their_vocabulary():
    with pytest.raises(ValueError, match="outcome='sucess'"):
        ServerMetrics().observe_request("a", "sucess")
    with pytest.raises(ValueError, match="not one of"):
        RouterMetrics().observe_request("r", "a", "ok")


def test_specs_follow_the_naming_rules():
    assert len(catalog.BY_NAME) == len(catalog.ALL_METRICS)
    for spec in catalog.ALL_METRICS:
        assert re.fullmatch(r"stillhouse_(server|router|request_log|rollout)_[a-z0-9_]+", spec.name), spec.name
        assert spec.help.endswith(".") and spec.component
    with pytest.raises(ValueError, match="end in _total"):
        MetricSpec("stillhouse_server_things", Kind.COUNTER, "Things.")
    with pytest.raises(ValueError, match="buckets"):
        MetricSpec("stillhouse_server_seconds", Kind.HISTOGRAM, "Seconds.")
    with pytest.raises(ValueError, match="label_values"):
        MetricSpec("stillhouse_server_x_total", Kind.COUNTER, "X.", ("a",), {"b": ("c",)})


def test_docs_table_is_generated_from_the_catalog():
    committed = (ROOT / "docs" / "metrics.md").read_text()
    assert committed == catalog.markdown_table(), "docs/metrics.md is stale: run `python -m monitoring.catalog > docs/metrics.md`"


@pytest.mark.parametrize("document", ["README.md", *[str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md"))]])
def test_every_metric_name_in_the_docs_is_in_the_catalog(document):
    text = (ROOT / document).read_text()
    histogram_series = {f"{spec.name}_{part}" for spec in catalog.ALL_METRICS if spec.kind is Kind.HISTOGRAM
                        for part in ("bucket", "count", "sum")}
    known = set(catalog.BY_NAME) | histogram_series
    named = set(re.findall(r"\bstillhouse_[a-z0-9_]+", text))
    assert named <= known, f"{document} names metrics the catalog does not have: {sorted(named - known)}"


def test_a_route_exports_every_series_at_zero_before_its_first_event():
    metrics = RouterMetrics()
    metrics.initialise_route("r", ["teacher", "student"], "teacher", ["mirror"], ["correct"], ["valid_output"])
    text = generate_latest(metrics.registry).decode()
    assert 'stillhouse_router_fallbacks_total{arm="student",fallback="teacher",route="r"} 0.0' in text
    assert 'stillhouse_router_fallbacks_total{arm="teacher"' not in text  # the fallback arm does not fall back to itself
    assert 'stillhouse_router_upstream_errors_total{arm="teacher",reason="connect",route="r"} 0.0' in text
    assert 'stillhouse_router_requests_total{arm="student",outcome="fallback",route="r"} 0.0' in text
    assert 'stillhouse_router_feedback_sum_negative_total{arm="student",metric="correct",route="r"} 0.0' in text
    assert 'stillhouse_router_output_check_count_total{arm="teacher",check="valid_output",route="r"} 0.0' in text
    assert 'stillhouse_router_shadow_requests_total{agreement="skipped",arm="mirror",route="r"} 0.0' in text
