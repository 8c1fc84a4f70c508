"""Dashboards and rules are generated from code: the committed files are current, and every panel documents itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from monitoring import dashboards, rules
from monitoring.dashboards.panel import DATASOURCE_UID
from stillhouse import main
from tests.binaries import promtool

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "monitoring" / "prometheus"


def test_committed_dashboards_and_rules_are_current(capsys):
    assert main(["dashboards", "build", "--check"]) == 0, capsys.readouterr().err
    assert dashboards.stale() == []


def test_a_stale_dashboard_is_reported(tmp_path):
    dashboards.build(tmp_path)
    assert dashboards.stale(tmp_path) == []
    path = tmp_path / f"{dashboards.DASHBOARDS[0].uid}.json"
    path.write_text(path.read_text().replace("Verdict", "Verdikt"))
    assert dashboards.stale(tmp_path) == [dashboards.DASHBOARDS[0].uid]


@pytest.mark.parametrize("spec", dashboards.DASHBOARDS, ids=lambda spec: spec.uid)
def test_every_panel_names_its_unit_and_describes_itself(spec):
    model = json.loads((dashboards.JSON_DIR / f"{spec.uid}.json").read_text())
    assert model["uid"] == spec.uid and len(model["panels"]) == len(spec.panels)
    for panel in model["panels"]:
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        description = panel["description"]
        assert description.endswith(".") and "\n" not in description, panel["title"]
        assert panel["datasource"]["uid"] == DATASOURCE_UID and panel["targets"], panel["title"]
    for variable in model.get("templating", {}).get("list", []):
        assert variable["datasource"]["uid"] == DATASOURCE_UID


def test_provisioning_points_at_the_datasource_and_the_dashboards():
    provisioning = ROOT / "monitoring" / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["uid"] == DATASOURCE_UID and datasource["type"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "stillhouse.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_promtool_accepts_the_config_and_the_rules():
    output = promtool("check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert f"SUCCESS: {len(rules.RECORDINGS) + len(rules.ALERTS)} rules found" in output


def test_promtool_unit_tests_cover_every_rule():
    tests = PROMETHEUS_DIR / "tests" / "stillhouse.test.yml"
    promtool("test", "rules", tests)
    text = tests.read_text()
    for recording in rules.RECORDINGS:
        assert f"expr: {recording.record}\n" in text, f"no promtool test for {recording.record}"
    for alert in rules.ALERTS:
        assert f"alertname: {alert.alert}\n" in text, f"no promtool test for {alert.alert}"
