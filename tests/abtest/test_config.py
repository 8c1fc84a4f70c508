"""The traffic-split file: the example validates; task prompts resolve; every problem is listed at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from abtest import config
from stillhouse import main
from training.task import load_task

EXAMPLE = Path(__file__).resolve().parents[2] / "abtest" / "examples" / "traffic.yaml"


def test_example_validates():
    loaded = config.load(EXAMPLE)
    route = loaded.routes["sentiment"]
    assert route.fallback_arm() == "teacher"
    assert route.render(route.arms["student-v1"], "Great!") == "Review: Great!\nSentiment:"
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
    del sentiment["arms"]["student-v2"]["prompt"]
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


def test_an_arm_naming_a_task_prompt_sends_exactly_what_the_task_renders():
    route = config.load(EXAMPLE).routes["sentiment"]
    task = load_task("sentiment")
    text = "Odd {braces} and {{text}}\nlines"
    assert route.render(route.arms["student-v1"], text) == task.student_prompt({"review": text})
    assert route.render(route.arms["teacher"], text) == task.teacher_prompt({"review": text})
    assert route.arms["student-v1"].template == "Review: {{text}}\nSentiment:"  # what template_version names
    assert config.template_version(route.arms["student-v1"].template) != config.template_version(route.arms["teacher"].template)


def test_a_task_prompt_follows_the_route_input_and_survives_a_dump():
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["routes"]["sentiment"]["input"] = "review_text"
    loaded = config.parse(raw)
    route = loaded.routes["sentiment"]
    assert route.arms["student-v1"].template == "Review: {{review_text}}\nSentiment:"
    assert route.render(route.arms["student-v1"], "Fine.") == "Review: Fine.\nSentiment:"
    dumped = loaded.model_dump(mode="json")["routes"]["sentiment"]["arms"]["student-v1"]
    assert "template" not in dumped and dumped["prompt"] == {"task": "sentiment", "role": "student"}
    assert config.parse(loaded.model_dump(mode="json")).version_hash == loaded.version_hash


def test_task_prompt_problems_name_the_field_and_fix(tmp_path):
    raw = yaml.safe_load(EXAMPLE.read_text())
    arms = raw["routes"]["sentiment"]["arms"]
    arms["teacher"]["prompt"]["task"] = "nope"
    arms["student-v1"]["prompt"]["role"] = "judge"
    arms["student-v2"]["template"] = "Review: {{text}}\nSentiment:"
    two_fields = load_task("sentiment").model_dump(by_alias=True) | {
        "name": "pair", "generator": None, "input_fields": ["review", "title"],
        "teacher_template": "{{title}}: {{review}}", "student_template": "{{title}}: {{review}}",
    }
    (tmp_path / "pair.yaml").write_text(yaml.safe_dump(two_fields))
    arms["student-v3"] = {"role": "candidate", "upstream": "http://127.0.0.1:8080", "prompt": {"task": str(tmp_path / "pair.yaml"), "role": "student"}}
    with pytest.raises(config.ConfigError) as caught:
        config.parse(raw)
    problems = {p.path: p for p in caught.value.problems}
    assert set(problems) == {
        "routes.sentiment.arms.teacher.prompt.task",
        "routes.sentiment.arms.student-v1.prompt.role",
        "routes.sentiment.arms.student-v2.prompt",
        "routes.sentiment.arms.student-v3.prompt.task",
    }
    assert "unknown task 'nope'" in problems["routes.sentiment.arms.teacher.prompt.task"].message
    assert "demo, sentiment" in problems["routes.sentiment.arms.teacher.prompt.task"].message
    assert "not both" in problems["routes.sentiment.arms.student-v2.prompt"].message
    assert "input fields ['review', 'title']" in problems["routes.sentiment.arms.student-v3.prompt.task"].message
    assert all(p.fix for p in caught.value.problems)


def test_a_route_template_is_checked_like_any_template():
    raw = yaml.safe_load(EXAMPLE.read_text())
    arms = raw["routes"]["sentiment"]["arms"]
    del arms["teacher"]["prompt"]
    arms["teacher"]["template"] = "Review: {text}\nSentiment:"
    del arms["student-v1"]["prompt"]
    arms["student-v1"]["template"] = "{{text}} ({{lang}})"
    with pytest.raises(config.ConfigError) as caught:
        config.parse(raw)
    messages = {p.path: str(p) for p in caught.value.problems}
    assert messages["routes.sentiment.arms.teacher.template"].endswith("the template has {text} in single braces, which is literal text; fix: write {{text}}")
    assert "the template uses ['lang']" in messages["routes.sentiment.arms.student-v1.template"]


def test_the_experiment_plan_and_output_checks_are_validated_with_the_route():
    route = config.load(EXAMPLE).routes["sentiment"]
    assert route.experiment.primary == "correct" and route.experiment.ramp.steps == [1, 5, 25, 50, 100]
    assert route.checks["valid_output"].passes(" Neutral.") and not route.checks["valid_output"].passes("maybe")
    raw = yaml.safe_load(EXAMPLE.read_text())
    sentiment = raw["routes"]["sentiment"]
    sentiment["experiment"] |= {"primary": "bleu", "secondary": ["rating", "correct"], "alpha": 0.7,
                                "guardrails": {"latency_p95": {}, "cost": {"max_absolute": 1}},
                                "ramp": {"steps": [5, 1]}, "colour": "red"}
    sentiment["checks"] |= {"correct": {"regex": "("}, "two": {"labels": ["a", "b"], "regex": "x"}}
    with pytest.raises(config.ConfigError) as error:
        config.parse(raw)
    paths = {problem.path for problem in error.value.problems}
    text = str(error.value)
    assert {"routes.sentiment.experiment.primary", "routes.sentiment.experiment.alpha", "routes.sentiment.experiment.colour",
            "routes.sentiment.experiment.guardrails.latency_p95", "routes.sentiment.experiment.guardrails.cost.[key]",
            "routes.sentiment.experiment.ramp", "routes.sentiment.checks.correct", "routes.sentiment.checks.two"} <= paths
    assert "'bleu' is neither a metric nor a check" in text and "a feedback metric has the same name" in text
    assert "set exactly one of max_relative_increase or max_absolute" in text and "must increase" in text
    assert "not a valid regular expression" in text and "set exactly one of labels, regex or json_schema" in text
