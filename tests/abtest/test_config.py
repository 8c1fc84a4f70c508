"""The traffic-split file: the example validates; every problem is listed at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from abtest import config
from stillhouse import main

EXAMPLE = Path(__file__).resolve().parents[2] / "abtest" / "examples" / "traffic.yaml"


def test_example_validates():
    loaded = config.load(EXAMPLE)
    route = loaded.routes["sentiment"]
    assert route.fallback_arm() == "teacher"
    assert route.render(route.arms["student-v1"], "Great!") == "Great!"
    assert route.render(route.arms["teacher"], "Great!").endswith("Review: Great!\nSentiment:")
    assert len(loaded.version_hash) == 12


def test_route_check_command(capsys):
    assert main(["route-check", str(EXAMPLE)]) == 0
    assert "valid" in capsys.readouterr().out


def test_version_hash_follows_content_not_formatting(tmp_path):
    raw = yaml.safe_load(EXAMPLE.read_text())
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(raw, default_flow_style=True))
    assert config.load(tmp_path / "a.yaml").version_hash == config.load(EXAMPLE).version_hash
    raw["routes"]["sentiment"]["arms"]["teacher"]["weight"] = 40
    assert config.parse(raw).version_hash != config.load(EXAMPLE).version_hash


def test_every_problem_is_reported_at_once(tmp_path):
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["colour"] = "blue"  # unknown top-level key
    raw["sticky"] = {"header": "X-User-Id", "per_request": True}  # two unit sources
    sentiment = raw["routes"]["sentiment"]
    sentiment["arms"]["teacher"]["wieght"] = 3  # misspelt
    sentiment["arms"]["student-v1"]["weight"] = -1
    sentiment["arms"]["student-v1"]["role"] = "control"  # two controls
    sentiment["arms"]["student-v2"]["template"] = "no placeholder"
    sentiment["metrics"]["correct"]["type"] = "percent"
    sentiment["shadow"][0]["arm"] = "ghost"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(config.ConfigError) as caught:
        config.load(tmp_path / "bad.yaml")
    paths = {p.path for p in caught.value.problems}
    assert {
        "colour",
        "sticky",
        "routes.sentiment.arms.teacher.wieght",
        "routes.sentiment.arms.student-v1.weight",
        "routes.sentiment.arms",
        "routes.sentiment.arms.student-v2.template",
        "routes.sentiment.metrics.correct.type",
        "routes.sentiment.shadow.0.arm",
    } <= paths
    assert all(p.fix for p in caught.value.problems)
    assert "fix:" in str(caught.value)


def test_yaml_syntax_and_shape_errors(tmp_path):
    (tmp_path / "broken.yaml").write_text("version: [1\n")
    with pytest.raises(config.ConfigError):
        config.load(tmp_path / "broken.yaml")
    with pytest.raises(config.ConfigError):
        config.parse(["not", "a", "mapping"])


def test_with_weights_validates():
    loaded = config.load(EXAMPLE)
    updated = config.with_weights(loaded, "sentiment", {"student-v1": 90, "teacher": 10})
    assert updated.routes["sentiment"].weights()["student-v1"] == 90
    assert updated.version_hash != loaded.version_hash
    with pytest.raises(config.ConfigError):
        config.with_weights(loaded, "sentiment", {"nobody": 1, "teacher": -2})
    with pytest.raises(config.ConfigError):
        config.with_weights(loaded, "nowhere", {})


def test_route_command_refuses_a_bad_config(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("version: 1\nsalt: x\nroutes: {r: {arms: {a: {role: boss}}}}\n")
    assert main(["route", "--config", str(tmp_path / "bad.yaml")]) == 1
    assert "routes.r.arms.a.role" in capsys.readouterr().err
