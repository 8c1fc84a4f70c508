"""The network side of curation: teacher self-consistency samples and judge scores.

:func:`sample_teacher` asks the teacher ``k`` more times per training row, at a temperature
above zero, and records the answers as ``teacher_samples``; :func:`judge` asks a judge endpoint
to score each row's output and records ``judge_score`` (with ``judge_output``, the output it
scored). The curation steps that use them (:func:`training.curation.self_consistency`,
:func:`training.curation.rank`) are pure.

Answers go to a resumable cache like the labelling one (:mod:`training.answer_cache`), so an
interrupted stage resumes where it stopped and a re-run asks nothing. Samples are asked as the
run's teacher variant votes (:func:`training.labelling.ask`); a sample's key is (endpoint,
prompt, generation settings, sample index): the endpoint protocol exposes no
sampling seed here, so the samples are unseeded draws, made reproducible by the cache rather
than by the server. A row whose request fails for good gets ``teacher_samples_error`` /
``judge_error`` and no samples / score; curation then drops it with its reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

from training import answer_cache, labelling
from training import judge as judge_prompts
from training.config import SelfConsistencyConfig
from training.endpoint import Endpoint
from training.row import Row
from training.shots import ShotPool
from training.task import Generation, Task
from training.teacher_variant import TeacherVariant


@dataclass(frozen=True)
class StageReport:
    """Rows asked about, requests answered from the cache or anew, and rows that failed."""

    rows: int
    cached: int
    requested: int
    failed: int


def sample_teacher(
    rows: list[Row], task: Task, teacher: Endpoint, settings: SelfConsistencyConfig, cache_path: Path, only: set[str],
    variant: TeacherVariant = TeacherVariant(), pool: ShotPool | None = None,
) -> tuple[list[Row], StageReport]:
    """Rows whose id is in ``only`` get ``teacher_samples``: ``settings.samples`` answers of the
    teacher asked as ``variant`` (the run's teacher variant, shots from ``pool``) at
    ``settings.temperature``; the other rows are returned unchanged."""
    sampling = variant.model_copy(update={"votes": settings.samples, "vote_temperature": settings.temperature})
    todo = [row for row in rows if row.id in only]
    answers, cached, requested = labelling.ask(todo, task, teacher, cache_path, sampling, pool)
    by_row = {row.id: answer for row, answer in zip(todo, answers)}
    sampled, failed = [], 0
    for row in rows:
        answer = by_row.get(row.id)
        if answer is None:
            sampled.append(row)
        elif answer.error is not None:
            failed += 1
            sampled.append(replace(row, teacher_samples=None, teacher_samples_error=answer.error))
        else:
            sampled.append(replace(row, teacher_samples=answer.samples, teacher_samples_error=None))
    return sampled, StageReport(len(todo), cached, requested, failed)


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
