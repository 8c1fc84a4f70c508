"""Teacher self-consistency: the pure curation step on crafted rows, and sampling a real HTTP
server (a stub speaking LoRAX's `/generate` JSON to the real lorax-client) through the cache."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace

import pytest
from fastapi import FastAPI, Request

from serving.loopback import free_port
from tests.serving.server_harness import serving_in_thread
from training import consistency, curation, dataset, recipe
from training.config import ConfigError, CurationConfig, DataConfig, EndpointConfig, RankingConfig, RunConfig, SelfConsistencyConfig, load_config
from training.dataset import DatasetError
from training.endpoint import Endpoint
from training.row import Row
from training.task import Task, load_task

TASK = load_task("demo")
CODES = Task(
    name="codes",
    input_fields=["text"],
    teacher_template="Code for: {{text}}\nCode:",
    student_template="{{text}}\nCode:",
    output={"type": "regex", "pattern": r"[A-Z]{2}-\d+"},
)


@contextmanager
def stub_server(answer: Callable[[str, dict], str]):
    """A loopback HTTP server answering LoRAX `POST /` generate requests with ``answer(prompt, parameters)``.

    Yields (url, requests): every request's JSON body, in arrival order.
    """
    app = FastAPI()
    seen: list[dict] = []
    lock = threading.Lock()

    @app.post("/")
    async def generate(request: Request):
        body = await request.json()
        with lock:
            seen.append(body)
        text = answer(body["inputs"], body["parameters"])
        details = {"finish_reason": "length", "prompt_tokens": len(body["inputs"].split()), "generated_tokens": 1, "seed": None, "prefill": [], "tokens": []}
        return [{"generated_text": text, "details": details}]

    with serving_in_thread(app, start_timeout_s=30) as url:
        yield url, seen


def row(row_id, review, output, samples=None, split="train", **extra):
    return Row(id=row_id, inputs={"review": review}, output=output, split=split, teacher_samples=samples, **extra)


def settings(**overrides):
    return SelfConsistencyConfig(**{"samples": 5, "min_agreement": 0.6, **overrides})


# --- the pure step


def test_majority_rows_are_kept_and_inconsistent_ones_dropped():
    rows = [
        row("agree", "Good", "positive", ["positive", "Positive.", "positive", "negative", "positive"]),
        row("split-vote", "Meh", "neutral", ["neutral", "positive", "negative", "neutral", "positive"]),
        row("garbage", "What", "neutral", ["neutral", "???", "", "no idea", "neutral"]),  # unparseable samples vote for nothing
        row("no-samples", "Hm", "neutral"),
    ]
    step = curation.self_consistency(rows, TASK, settings())
    assert [kept.id for kept in step.kept] == ["agree"]
    assert {dropped.id: reason for dropped, reason in step.dropped} == {
        "split-vote": "inconsistent_teacher",
        "garbage": "inconsistent_teacher",
        "no-samples": "no_teacher_samples",
    }
    assert step.report(len(rows))["dropped"] == {"inconsistent_teacher": 2, "no_teacher_samples": 1}


def test_a_confident_majority_against_the_output_relabels_or_drops():
    rows = [
        row("flip", "Fine", "neutral", ["positive"] * 4 + ["neutral"], teacher_logprob=-0.1, teacher_tokens=[7]),
        row("keep", "Bad", "negative", ["negative"] * 5),
    ]
    relabelled = curation.self_consistency(rows, TASK, settings(relabel=True))
    assert [(kept.id, kept.output) for kept in relabelled.kept] == [("flip", "positive"), ("keep", "negative")]
    assert "teacher_logprob" not in relabelled.kept[0].to_json()  # it scored the old output
    assert relabelled.kept[0].teacher_tokens == (7,)  # training aligns these with the output itself
    assert relabelled.params["relabelled"] == [{"id": "flip", "from": "neutral", "to": "positive"}]

    strict = curation.self_consistency(rows, TASK, settings(relabel=False))
    assert [kept.id for kept in strict.kept] == ["keep"]
    assert [(dropped.id, reason) for dropped, reason in strict.dropped] == [("flip", "disagrees_with_vote")]
    assert "relabelled" not in strict.params


def test_a_tie_keeps_the_rows_own_output():
    rows = [row("tie", "So so", "neutral", ["neutral", "neutral", "positive", "positive"])]
    step = curation.self_consistency(rows, TASK, settings(samples=4, min_agreement=0.5, relabel=True))
    assert [(kept.id, kept.output) for kept in step.kept] == [("tie", "neutral")]
    assert step.params["relabelled"] == []


def test_test_rows_are_never_dropped():
    rows = [
        row("train", "Good", "positive", ["positive"] * 5),
        row("test-inconsistent", "Meh", "neutral", ["positive", "negative", "neutral", "positive", "negative"], split="test"),
        row("test-unsampled", "Hm", "neutral", split="test"),
        row("test-disagrees", "Fine", "neutral", ["positive"] * 5, split="test"),
    ]
    step = curation.self_consistency(rows, TASK, settings(relabel=True))
    assert step.kept == rows and step.dropped == [] and step.params["relabelled"] == []


def test_free_text_tasks_vote_by_exact_stripped_text():
    rows = [
        Row(id="a", inputs={"text": "x"}, output="AB-1", split="train", teacher_samples=[" AB-1", "AB-1 ", "AB-2", "AB-1", "ab-1"]),
        Row(id="b", inputs={"text": "y"}, output="CD-1", split="train", teacher_samples=["CD-2", "CD-2", "CD-2", "CD-1", "nope"]),
        Row(id="c", inputs={"text": "z"}, output="EF-1", split="train", teacher_samples=["EF-1", "EF-2", "EF-3", "EF-4", "EF-5"]),
    ]
    step = curation.self_consistency(rows, CODES, settings(relabel=True))
    assert [(kept.id, kept.output) for kept in step.kept] == [("a", "AB-1"), ("b", "CD-2")]
    assert [(dropped.id, reason) for dropped, reason in step.dropped] == [("c", "inconsistent_teacher")]


def test_configured_but_never_sampled_is_an_error_naming_the_fix():
    with pytest.raises(DatasetError, match="teacher_samples.*stillhouse data curate.*remove curation.self_consistency"):
        curation.self_consistency([row("a", "Good", "positive")], TASK, settings())


def test_curate_runs_consistency_after_the_split_and_before_ranking_and_balance():
    rows = [row(f"r{i}", f"Review number {i} about a desk of type {i * 31}", "positive", ["positive"] * 3, split=None, teacher_logprob=-i) for i in range(20)]
    config = CurationConfig(self_consistency=settings(samples=3), ranking=RankingConfig(keep_fraction=0.5))
    curated, reports = curation.curate(rows, TASK, config, DataConfig(test_fraction=0.2))
    assert [report["step"] for report in reports] == ["rule_filter", "near_dedup", "split", "self_consistency", "ranking", "balance"]
    assert reports[3]["rows_in"] == reports[3]["rows_out"] == 20
    train = [r for r in curated if r.split == "train"]
    assert len(train) == reports[4]["params"]["scored_rows"] // 2


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"curation.self_consistency.samples: Input should be greater than or equal to 2"):
        load_config(None, {"name": "x", "curation.self_consistency": {"samples": 1}})
    with pytest.raises(ConfigError, match=r"curation.self_consistency.temperature"):
        load_config(None, {"name": "x", "curation.self_consistency": {"temperature": 0}})
    with pytest.raises(ConfigError, match=r"curation.self_consistency.min_agreement"):
        load_config(None, {"name": "x", "curation.self_consistency": {"min_agreement": 1.5}})
    with pytest.raises(ConfigError, match=r"curation.self_consistency.votes: unknown key"):
        load_config(None, {"name": "x", "curation.self_consistency": {"votes": 3}})
    assert load_config(None, {"name": "x"}).curation.self_consistency is None


# --- sampling a real server


def torn_teacher() -> Callable[[str, dict], str]:
    """A teacher sure about desks and torn about chairs: a chair prompt's n-th request gets the n-th of three labels."""
    asked: Counter = Counter()
    lock = threading.Lock()

    def answer(prompt: str, parameters: dict) -> str:
        if "chair" not in prompt.rsplit("Review:", 1)[-1]:
            return " positive\n"
        with lock:
            asked[prompt] += 1
            return [" positive", " negative", " neutral"][asked[prompt] % 3]

    return answer


def test_sampling_a_server_is_cached_and_resumes(tmp_path):
    rows = [row(f"desk{i}", f"A desk {i}", "positive") for i in range(3)] + [row("chair", "A chair", "positive"), row("other", "Not asked", "neutral")]
    with stub_server(torn_teacher()) as (url, seen):
        teacher = Endpoint(EndpointConfig(url=url, concurrency=3))
        cache = tmp_path / "samples.jsonl"
        only = {"desk0", "desk1", "desk2", "chair"}
        sampled, report = consistency.sample_teacher(rows, TASK, teacher, settings(samples=3, temperature=0.9), cache, only)
        assert (report.rows, report.requested, report.cached, report.failed) == (4, 12, 0, 0)
        assert len(seen) == 12
        assert all(body["parameters"]["do_sample"] and body["parameters"]["temperature"] == 0.9 for body in seen)
        assert {body["inputs"] for body in seen} == {TASK.teacher_prompt(r.inputs) for r in rows if r.id in only}
        assert sampled[0].teacher_samples == ("positive",) * 3
        assert sorted(sampled[3].teacher_samples) == ["negative", "neutral", "positive"]
        assert "teacher_samples" not in sampled[4].to_json()

        # A torn last line (killed mid-write) is ignored: only what is missing is asked again.
        lines = cache.read_text().splitlines()
        cache.write_text("\n".join(lines[:10]) + "\n" + lines[10][:7])
        again, report = consistency.sample_teacher(rows, TASK, teacher, settings(samples=3, temperature=0.9), cache, only)
        assert (report.requested, report.cached) == (2, 10) and len(seen) == 14
        assert again[0].teacher_samples == sampled[0].teacher_samples

        _, report = consistency.sample_teacher(rows, TASK, teacher, settings(samples=3, temperature=0.9), cache, only)
        assert (report.requested, report.cached) == (0, 12) and len(seen) == 14  # zero requests

        step = curation.self_consistency([replace(r, split="train") for r in sampled if r.id in only], TASK, settings(samples=3))
        assert [kept.id for kept in step.kept] == ["desk0", "desk1", "desk2"]
        assert [(dropped.id, reason) for dropped, reason in step.dropped] == [("chair", "inconsistent_teacher")]


def test_failed_samples_leave_the_row_without_samples(tmp_path):
    teacher = Endpoint(EndpointConfig(url=f"http://127.0.0.1:{free_port()}", retries=0, timeout_s=2))
    sampled, report = consistency.sample_teacher([row("a", "A desk", "positive")], TASK, teacher, settings(samples=2), tmp_path / "c.jsonl", {"a"})
    assert report.failed == 1 and "teacher_samples" not in sampled[0].to_json() and "teacher_samples_error" in sampled[0].to_json()


def test_the_recipe_samples_judges_and_curates_a_run(tmp_path):
    source = tmp_path / "rows.jsonl"
    reviews = [f"A desk number {i} of model {i * 17}" for i in range(12)] + [f"A chair number {i} of model {i * 19}" for i in range(6)]
    source.write_text("".join(json.dumps({"id": f"r{i}", "review": text, "label": "positive"}) + "\n" for i, text in enumerate(reviews)))

    teacher = torn_teacher()

    def answer(prompt: str, parameters: dict) -> str:
        if prompt.startswith("Rate"):  # the judge: longer reviews score higher
            return f" {len(prompt)} / 100"
        return teacher(prompt, parameters)

    with stub_server(answer) as (url, seen):
        curation_config = {
            "self_consistency": {"samples": 3, "min_agreement": 0.9},
            "ranking": {"by": "judge", "keep_fraction": 0.5, "judge": {"url": url}, "judge_prompt": "Rate {{output}} for: {{input}}\nScore:"},
            "balance": False,
        }
        config = RunConfig.model_validate(
            {"name": "sc", "runs_dir": str(tmp_path / "runs"), "teacher": {"url": url}, "data": {"source": str(source), "test_fraction": 0.2}, "curation": curation_config}
        )
        said = []
        recipe.build(config, TASK, said.append)
        recipe.prepare_curation(config, TASK, said.append)
        card = recipe.curate(config, TASK, said.append)
        asked = len(seen)
        rows = dataset.read_rows(tmp_path / "runs" / "sc" / "data" / "rows.jsonl")
        sampled = [r for r in rows if "teacher_samples" in r.to_json()]
        judged = [r for r in rows if "judge_score" in r.to_json()]
        assert asked == 3 * len(sampled) + len(judged)
        assert {r.id for r in judged} < {r.id for r in sampled} and not any("chair" in r.inputs["review"] for r in judged)

        recipe.prepare_curation(config, TASK, said.append)  # everything is cached now
        assert len(seen) == asked

    steps = {step["step"]: step for step in card["steps"]}
    consistent = steps["self_consistency"]
    chairs = sum(1 for r in sampled if "chair" in r.inputs["review"])
    assert consistent["dropped"] == {"inconsistent_teacher": chairs} and chairs > 0
    assert card["splits"]["train"]["rows"] == (consistent["rows_out"] - card["splits"]["test"]["rows"]) // 2
    assert steps["ranking"]["params"]["threshold"] is not None
    assert any(line.startswith("sampled the teacher 3x") for line in said) and any(line.startswith("judged ") for line in said)
    markdown = (tmp_path / "runs" / "sc" / "data" / "card.md").read_text()
    assert "| self_consistency |" in markdown and "| ranking |" in markdown


def test_self_consistency_without_a_teacher_is_a_config_error(tmp_path):
    config = RunConfig.model_validate({"name": "x", "runs_dir": str(tmp_path), "curation": {"self_consistency": {}}})
    with pytest.raises(ConfigError, match="teacher.url"):
        recipe.prepare_curation(config, TASK, lambda _: None)


def test_data_curate_on_the_command_line_samples_when_configured(tmp_path, capsys):
    import yaml

    import stillhouse

    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"review": f"A desk number {i} of model {i * 17}", "label": "positive"}) + "\n" for i in range(8)))
    with stub_server(torn_teacher()) as (url, seen):
        config = {"name": "cli", "runs_dir": str(tmp_path / "runs"), "teacher": {"url": url}, "data": {"source": str(source)},
                  "curation": {"self_consistency": {"samples": 2}}}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
        assert stillhouse.main(["data", "build", "--config", str(tmp_path / "run.yaml")]) == 0
        assert stillhouse.main(["data", "curate", "--config", str(tmp_path / "run.yaml")]) == 0
        assert len(seen) > 0 and "sampled the teacher 2x" in capsys.readouterr().err

    del config["teacher"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert stillhouse.main(["data", "curate", "--config", str(tmp_path / "run.yaml")]) == 2
    assert "curation.self_consistency samples the teacher: set teacher.url" in capsys.readouterr().err
