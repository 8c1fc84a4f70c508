"""Auxiliary ranking: the pure step on crafted rows, its config, and judge scoring against a real HTTP server."""

from __future__ import annotations

import pytest

from training import consistency, curation, judge
from training.config import ConfigError, EndpointConfig, RankingConfig, load_config
from training.dataset import DatasetError
from training.endpoint import Endpoint
from training.row import Row
from training.task import load_task
from tests.training.test_consistency import stub_server

TASK = load_task("demo")


def row(row_id, output="positive", split="train", **extra):
    return Row(id=row_id, inputs={"review": f"Review {row_id}"}, output=output, split=split, **extra)


def test_keeps_exactly_the_top_fraction_with_ties_broken_by_id():
    rows = [row(f"r{i}", teacher_logprob=-float(i)) for i in range(10)]
    rows += [row("tie-b", teacher_logprob=-3.0), row("tie-a", teacher_logprob=-3.0)]  # ties with r3
    rows += [row("test", split="test", teacher_logprob=-99.0)]
    step = curation.rank(rows, RankingConfig(keep_fraction=0.42))
    kept = [r.id for r in step.kept]
    assert kept == ["r0", "r1", "r2", "r3", "tie-a", "test"]  # floor(0.42 × 12) = 5 scored rows; at -3.0, r3 < tie-a < tie-b by id
    assert step.params == {"by": "teacher_logprob", "keep_fraction": 0.42, "scored_rows": 12, "per_token": False, "threshold": -3.0}
    assert step.report(len(rows))["dropped"] == {"below_threshold": 7}
    shuffled = curation.rank(list(reversed(rows)), RankingConfig(keep_fraction=0.42))
    assert sorted(r.id for r in shuffled.kept) == sorted(kept) and shuffled.params == step.params


def test_a_small_fraction_keeps_at_least_one_row():
    step = curation.rank([row("a", teacher_logprob=-1.0), row("b", teacher_logprob=-2.0)], RankingConfig(keep_fraction=0.1))
    assert [r.id for r in step.kept] == ["a"]


def test_rows_without_a_score_are_dropped_as_no_score():
    rows = [row("a", teacher_logprob=-1.0), row("b"), row("c", teacher_logprob=-2.0), row("d", split="test")]
    step = curation.rank(rows, RankingConfig(keep_fraction=1.0))
    assert [r.id for r in step.kept] == ["a", "c", "d"]
    assert [(r.id, reason) for r, reason in step.dropped] == [("b", "no_score")]


def test_per_token_divides_by_the_answer_length():
    rows = [row("long", teacher_logprob=-3.0, teacher_tokens=[1, 2, 3, 4, 5, 6]), row("short", teacher_logprob=-1.0, teacher_tokens=[1])]
    assert [r.id for r in curation.rank(rows, RankingConfig(keep_fraction=0.5, per_token=True)).kept] == ["long"]
    assert [r.id for r in curation.rank(rows, RankingConfig(keep_fraction=0.5)).kept] == ["short"]


def test_no_logprob_on_any_row_is_an_error_naming_the_field_and_fix():
    with pytest.raises(DatasetError, match="no training row has a teacher_logprob; label with a teacher"):
        curation.rank([row("a"), row("b")], RankingConfig())
    with pytest.raises(DatasetError, match="no training row has a teacher_logprob and teacher_tokens"):
        curation.rank([row("a", teacher_logprob=-1.0)], RankingConfig(per_token=True))
    with pytest.raises(DatasetError, match="no training row has a judge_score"):
        curation.rank([row("a")], RankingConfig(by="judge", judge=EndpointConfig(url="http://x"), judge_prompt="{{input}} {{output}}"))


def test_a_judge_score_counts_only_for_the_output_it_judged():
    config = RankingConfig(by="judge", keep_fraction=1.0, judge=EndpointConfig(url="http://x"), judge_prompt="{{input}} {{output}}")
    rows = [row("a", judge_score=5.0, judge_output="positive"), row("b", output="negative", judge_score=9.0, judge_output="positive")]
    step = curation.rank(rows, config)
    assert [r.id for r in step.kept] == ["a"] and [(r.id, reason) for r, reason in step.dropped] == [("b", "no_score")]


def test_config_validation_names_the_field_and_fix():
    with pytest.raises(ConfigError) as error:
        load_config(None, {"name": "x", "curation.ranking": {"by": "judge"}})
    assert "curation.ranking.judge is required when by is 'judge'; add judge: {url: URL}" in str(error.value)
    assert "curation.ranking.judge_prompt is required when by is 'judge'" in str(error.value)
    with pytest.raises(ConfigError, match=r"judge_prompt never uses \{\{output\}\}; add \{\{output\}\}"):
        load_config(None, {"name": "x", "curation.ranking": {"by": "judge", "judge": {"url": "http://j"}, "judge_prompt": "Rate {{input}}"}})
    with pytest.raises(ConfigError, match="curation.ranking.keep_fraction"):
        load_config(None, {"name": "x", "curation.ranking": {"keep_fraction": 0}})
    with pytest.raises(ConfigError, match="curation.ranking.by"):
        load_config(None, {"name": "x", "curation.ranking": {"by": "length"}})
    with pytest.raises(ConfigError, match=r"curation.ranking.judge.bogus: unknown key"):
        load_config(None, {"name": "x", "curation.ranking": {"by": "judge", "judge": {"url": "http://j", "bogus": 1}, "judge_prompt": "{{input}}{{output}}"}})
    with pytest.raises(ConfigError, match="per_token applies to by: teacher_logprob only"):
        load_config(None, {"name": "x", "curation.ranking": {"by": "judge", "per_token": True, "judge": {"url": "http://j"}, "judge_prompt": "{{input}}{{output}}"}})
    config = load_config(None, {"name": "x", "curation.ranking": {"by": "judge", "judge": {"url": "http://j"}, "judge_prompt": "{{input}} -> {{output}}"}})
    assert config.curation.ranking.judge.url == "http://j"


def test_judge_prompt_rendering_and_score_parsing():
    assert judge.render_prompt('{"q": "{{input}}"} {{output}}', "a {{output}} b", "X") == '{"q": "a {{output}} b"} X'
    with pytest.raises(ValueError, match=r"judge prompt has \{input\} in single braces, which is literal text; write \{\{input\}\}"):
        judge.render_prompt("Rate {input}: {{output}}", "a", "b")
    assert [judge.parse_score(text) for text in (" 7/10", "Score: -2.5", "none", "")] == [7.0, -2.5, None, None]


def test_judge_scores_against_a_server_are_cached(tmp_path):
    def answer(prompt: str, parameters: dict) -> str:
        assert not parameters["do_sample"]
        return " I cannot say" if "Review c" in prompt else f" {prompt.count('o')} out of 10"

    rows = [row("a"), row("b", output="negative"), row("c"), row("d", split="test")]
    outputs = {"a": "positive", "b": "negative", "c": "positive"}
    template = "Input: {{input}}\nAnswer: {{output}}\nScore 0-10:"
    with stub_server(answer) as (url, seen):
        endpoint = Endpoint(EndpointConfig(url=url, concurrency=2))
        judged, report = consistency.judge(rows, TASK, endpoint, template, tmp_path / "judge.jsonl", outputs)
        assert (report.rows, report.requested, report.cached, report.failed) == (3, 3, 0, 1)
        expected = judge.render_prompt(template, "Review a", "positive")
        assert judged[0].judge_score == float(expected.count("o")) and judged[0].judge_output == "positive"
        assert judged[2].to_json()["judge_score"] is None and "no number" in judged[2].judge_error
        assert "judge_score" not in judged[3].to_json()

        again, report = consistency.judge(rows, TASK, endpoint, template, tmp_path / "judge.jsonl", outputs)
        assert (report.requested, report.cached) == (0, 3) and len(seen) == 3 and again == judged

    step = curation.rank(judged, RankingConfig(by="judge", keep_fraction=1.0, judge=EndpointConfig(url=url), judge_prompt=template))
    assert [r.id for r in step.kept] == ["a", "b", "d"] and [(r.id, reason) for r, reason in step.dropped] == [("c", "no_score")]
