"""The network side of curation: teacher self-consistency samples and judge scores.

:func:`sample_teacher` asks the teacher ``k`` more times per training row, at a temperature
above zero, and records the answers as ``teacher_samples``; :func:`judge` asks a judge endpoint
to score each row's output and records ``judge_score`` (with ``judge_output``, the output it
scored). The curation steps that use them (:func:`training.curation.self_consistency`,
:func:`training.curation.rank`) are pure.

Answers go to a resumable cache like the labelling one (:mod:`training.answer_cache`), so an
interrupted stage resumes where it stopped and a re-run asks nothing. A sample's
key is (endpoint, prompt, generation settings, sample index): the endpoint protocol exposes no
sampling seed here, so the samples are unseeded draws, made reproducible by the cache rather
than by the server. A row whose request fails for good gets ``teacher_samples_error`` /
``judge_error`` and no samples / score; curation then drops it with its reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

from training import answer_cache
from training import judge as judge_prompts
from training.config import SelfConsistencyConfig
from training.endpoint import Endpoint
from training.row import Row
from training.task import Generation, Task


@dataclass(frozen=True)
class StageReport:
    """Rows asked about, requests answered from the cache or anew, and rows that failed."""

    rows: int
    cached: int
    requested: int
    failed: int


def sample_teacher(
    rows: list[Row], task: Task, teacher: Endpoint, settings: SelfConsistencyConfig, cache_path: Path, only: set[str]
) -> tuple[list[Row], StageReport]:
    """Rows whose id is in ``only`` get ``teacher_samples``: ``settings.samples`` answers of the
    teacher's prompt at ``settings.temperature``; the other rows are returned unchanged."""
    generation = task.generation.model_copy(update={"temperature": settings.temperature})
    todo = [row for row in rows if row.id in only]
    jobs = []
    for row in todo:
        prompt = task.teacher_prompt(row.inputs)
        jobs += [(_key(teacher, prompt, generation, index), prompt) for index in range(settings.samples)]
    answers, cached = _ask_all(teacher, jobs, generation, cache_path)

    by_row = {row.id: answers[position * settings.samples : (position + 1) * settings.samples] for position, row in enumerate(todo)}
    sampled, failed = [], 0
    for row in rows:
        if row.id not in by_row:
            sampled.append(row)
            continue
        errors = [answer["error"] for answer in by_row[row.id] if "error" in answer]
        if errors:
            failed += 1
            sampled.append(replace(row, teacher_samples=None, teacher_samples_error=errors[0]))
        else:
            samples = [answer["text"].strip() for answer in by_row[row.id]]
            sampled.append(replace(row, teacher_samples=samples, teacher_samples_error=None))
    return sampled, StageReport(len(todo), cached, len(jobs) - cached, failed)


def judge(rows: list[Row], task: Task, judge_endpoint: Endpoint, template: str, cache_path: Path, outputs: dict[str, str]) -> tuple[list[Row], StageReport]:
    """Rows whose id is in ``outputs`` get ``judge_score`` for that output (the number the judge
    answers to ``template`` rendered with the row's ``{{input}}`` and the ``{{output}}``) and
    ``judge_output``; the other rows are returned unchanged."""
    todo = [row for row in rows if row.id in outputs]
    jobs = []
    for row in todo:
        prompt = judge_prompts.render_prompt(template, task.input_text(row.inputs), outputs[row.id])
        jobs.append((_key(judge_endpoint, prompt, judge_prompts.GENERATION, 0), prompt))
    answers, cached = _ask_all(judge_endpoint, jobs, judge_prompts.GENERATION, cache_path)

    by_row = {row.id: answer for row, answer in zip(todo, answers)}
    judged, failed = [], 0
    for row in rows:
        answer = by_row.get(row.id)
        if answer is None:
            judged.append(row)
            continue
        score = judge_prompts.parse_score(answer.get("text", ""))
        error = None
        if "error" in answer or score is None:
            failed += 1
            error = answer.get("error") or f"no number in the judge's answer {answer['text']!r}"
        judged.append(replace(row, judge_score=score if error is None else None, judge_output=outputs[row.id], judge_error=error))
    return judged, StageReport(len(todo), cached, len(jobs) - cached, failed)


def _ask_all(endpoint: Endpoint, jobs: list[tuple[str, str]], generation: Generation, cache_path: Path) -> tuple[list[dict], int]:
    """Each (key, prompt) job's answer, from the cache or the endpoint; and how many were cached."""

    def ask(prompt: str) -> dict:
        return {"text": endpoint.complete(prompt, generation).text}

    return answer_cache.ask_all([(key, functools.partial(ask, prompt)) for key, prompt in jobs], cache_path, endpoint.config.concurrency)


def _key(endpoint: Endpoint, prompt: str, generation: Generation, index: int) -> str:
    return answer_cache.cache_key(endpoint.identity, prompt, generation.model_dump(), index)
