"""Metrics and their intervals: pure functions checked against known values."""

from __future__ import annotations

import pytest

from training.evaluation import bootstrap_interval, macro_f1, score, wilson_interval
from training.task import load_task


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson_interval(81, 263)  # Wilson (1927) / Newcombe (1998) example
    assert low == pytest.approx(0.2553, abs=1e-4)
    assert high == pytest.approx(0.3662, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0


def test_macro_f1_averages_per_label_f1():
    references = ["a", "a", "b", "c"]
    predictions = ["a", "b", "b", "b"]
    # a: tp1 fp0 fn1 -> 2/3; b: tp1 fp2 fn0 -> 0.5; c: 0
    assert macro_f1(references, predictions, ["a", "b", "c"]) == pytest.approx((2 / 3 + 0.5 + 0) / 3)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    references = ["a"] * 50 + ["b"] * 50
    predictions = ["a"] * 40 + ["b"] * 10 + ["b"] * 45 + ["a"] * 5
    def accuracy(r, p):
        return sum(x == y for x, y in zip(r, p)) / len(r)
    first = bootstrap_interval(accuracy, references, predictions, resamples=300, seed=1)
    assert first == bootstrap_interval(accuracy, references, predictions, resamples=300, seed=1)
    assert first[0] < 0.85 < first[1]


def test_score_parses_outputs_and_counts_failed_requests_as_wrong():
    task = load_task("demo")
    metrics = {m.name: m for m in score(task, ["positive", "negative", "neutral", "positive"], [" positive", "Negative\n", "banana", None])}
    assert metrics["accuracy"].value == 0.5 and metrics["accuracy"].n == 4
    assert metrics["accuracy"].interval == "wilson"
    assert metrics["macro_f1"].interval == "bootstrap"
    assert 0.0 <= metrics["macro_f1"].low <= metrics["macro_f1"].value <= metrics["macro_f1"].high <= 1.0


def test_mean_interval_is_the_student_t_interval():
    from training.evaluation import mean_interval

    metric = mean_interval("judge", [1, 2, 3, 4, 5])
    assert (metric.value, metric.n, metric.interval) == (3.0, 5, "t")
    half = 2.7764451 * 1.5811388 / 5**0.5  # t(0.975, 4) · sd / √n
    assert metric.low == pytest.approx(3 - half, abs=1e-5) and metric.high == pytest.approx(3 + half, abs=1e-5)


def test_the_task_judge_criterion_scores_outputs_through_a_judge_endpoint(tmp_path):
    import yaml

    from tests.training.test_consistency import stub_server
    from training.config import EndpointConfig
    from training.endpoint import Endpoint
    from training.evaluation import evaluate, report_markdown
    from training.row import Row

    spec = load_task("demo").model_dump(by_alias=True)
    spec.update(name="judged", generator=None, judge={"prompt": "Review: {{input}}\nLabel: {{output}}\nGold: {{reference}}\nScore 1-5:", "scale": [1, 5]})
    (tmp_path / "judged.yaml").write_text(yaml.safe_dump(spec))
    task = load_task(str(tmp_path / "judged.yaml"))
    rows = [Row(id=str(i), inputs={"review": text}, gold="positive") for i, text in enumerate(["good", "fine", "bad", "odd"])]

    def student(prompt: str, parameters: dict) -> str:
        return " negative" if "bad" in prompt else " positive"

    def judge(prompt: str, parameters: dict) -> str:
        assert "Gold: positive" in prompt and "Label: " in prompt
        return {"good": " 5", "fine": " 4", "bad": " 9 (very bad)", "odd": " no idea"}[prompt.split("\n")[0].split(": ")[1]]

    with stub_server(student) as (student_url, _), stub_server(judge) as (judge_url, judged):
        report = evaluate(task, rows, Endpoint(EndpointConfig(url=student_url)), "student", Endpoint(EndpointConfig(url=judge_url)))
    assert len(judged) == 4
    metric = report.metric("judge")
    assert (metric.value, metric.n) == (4.5, 2)  # 9 is off the 1-5 scale and "no idea" has no number: unscored
    assert [p["judge_score"] for p in report.predictions] == [5.0, 4.0, None, None]
    assert "judge [95% CI]" in report_markdown(task, [report])

    with pytest.raises(ValueError, match="has no judge criterion"):
        with stub_server(student) as (url, _):
            evaluate(load_task("demo"), rows, Endpoint(EndpointConfig(url=url)), "student", Endpoint(EndpointConfig(url=url)))


def test_a_judge_prompt_without_its_placeholders_is_refused(tmp_path):
    import yaml

    from training.task import TaskError

    spec = load_task("demo").model_dump(by_alias=True)
    spec.update(name="judged", judge={"prompt": "Rate this", "scale": [5, 1]})
    (tmp_path / "judged.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(TaskError) as error:
        load_task(str(tmp_path / "judged.yaml"))
    assert "judge.prompt never uses {{input}}" in str(error.value) and "judge.scale [5.0, 1.0] is empty" in str(error.value)
