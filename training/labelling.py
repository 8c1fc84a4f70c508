"""Teacher labelling: run the teacher's prompt over rows and record its answers as outputs.

The teacher is asked as the run's teacher variant (:mod:`training.teacher_variant`; by default
the task's teacher template): :func:`ask` returns one :class:`Answer` per row, and
:func:`label` writes it into the rows. Answers go to a resumable cache
(:mod:`training.answer_cache`) keyed by (teacher, prompt, generation settings, and the top-k,
constraint and sample index when there are any), each line flushed as it arrives, so an
interrupted run resumes where it stopped and a re-run costs nothing; `stillhouse teacher
compare` shares the cache. A row whose request fails for good keeps ``output`` None with
``label_error`` set; curation then drops it as ``missing_output``.

Each labelled row records ``teacher_logprob`` (the summed log-probability of the teacher's
generated tokens) and ``teacher_tokens`` (their ids) when the endpoint reports them (LoRAX
always; OpenAI ids only with top-k). Asked for ``top_k`` > 0 (logit distillation), rows also get
``teacher_top_logprobs``: per generated token, the teacher's ``top_k`` most likely
``[id, logprob]`` pairs, best first. A voting variant also records its samples as
``teacher_samples``; ``teacher`` names the endpoint and, unless it is the task's own prompt, the variant.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from pathlib import Path

from training import answer_cache
from training.endpoint import Endpoint
from training.row import Row
from training.shots import ShotPool
from training.task import Task
from training.teacher_variant import TeacherVariant, vote


@dataclass(frozen=True)
class LabellingReport:
    """Rows labelled; requests answered from the cache and asked anew (a voting variant asks several per row); rows that failed."""

    rows: int
    cached: int
    requested: int
    failed: int
    mean_prompt_tokens: float


#: what a teacher's answer adds to a row besides ``output``; a new answer replaces all of them
TEACHER_FIELDS = ("teacher", "teacher_logprob", "teacher_tokens", "teacher_top_logprobs", "label_error")


@dataclass(frozen=True)
class Answer:
    """The teacher's answer to one row under a variant: the vote's winner when it votes.

    ``error`` is set (and ``text`` None) when a request failed for good. ``agreement`` is the
    winner's share of the samples (1.0 for a single answer); ``started``/``finished`` are the wall
    clock times of the requests (None for answers cached before they were recorded).
    """

    text: str | None
    error: str | None = None
    samples: tuple[str, ...] = ()
    agreement: float = 1.0
    prompt_tokens: int = 0
    latency_s: float | None = None
    started: float | None = None
    finished: float | None = None
    logprob: float | None = None
    tokens: tuple[int, ...] | None = None
    top_logprobs: list | None = None


def ask(
    rows: list[Row], task: Task, teacher: Endpoint, cache_path: Path, variant: TeacherVariant = TeacherVariant(),
    pool: ShotPool | None = None, top_k: int = 0,
) -> tuple[list[Answer], int, int]:
    """The teacher's answer to every row under ``variant`` (gold shots from ``pool``), from the cache
    or by asking; and how many requests were answered from the cache and how many asked anew."""
    protocol = teacher.config.protocol
    generation = variant.generation(task, protocol)
    constraint = variant.constraint(task, protocol)

    def request(prompt: str) -> dict:
        started = time.time()
        completion = teacher.complete(prompt, generation, top_k=top_k, constraint=constraint)
        entry = {"text": completion.text, "prompt_tokens": completion.prompt_tokens, "latency_s": completion.latency_s,
                 "started": started, "finished": time.time()}
        if completion.logprob is not None:
            entry["logprob"] = completion.logprob
        if completion.token_ids:
            entry["tokens"] = list(completion.token_ids)
        if top_k:
            entry["top_logprobs"] = [[[i, v] for i, v in top.items()] for top in completion.top_logprobs]
        return entry

    jobs = []
    for row in rows:
        prompt = variant.prompt(task, row, pool)
        extras = ([{"top_k": top_k}] if top_k else []) + ([{"constraint": constraint}] if constraint else [])
        for index in range(variant.votes):
            sample = [{"sample": index}] if variant.votes > 1 else []
            key = answer_cache.cache_key(teacher.identity, prompt, generation.model_dump(), *extras, *sample)
            jobs.append((key, functools.partial(request, prompt)))
    entries, cached = answer_cache.ask_all(jobs, cache_path, teacher.config.concurrency)
    answers = [_answer(task, variant, entries[i * variant.votes : (i + 1) * variant.votes]) for i in range(len(rows))]
    return answers, cached, len(jobs) - cached


def _answer(task: Task, variant: TeacherVariant, entries: list[dict]) -> Answer:
    """One row's answer from its cache entries (one per sample)."""
    errors = [entry["error"] for entry in entries if "error" in entry]
    if errors:
        return Answer(None, error=errors[0])
    samples = [variant.read(entry["text"]) for entry in entries]
    winner, agreement = vote(task, samples) if variant.votes > 1 else (samples[0], 1.0)
    chosen = next(entry for entry, sample in zip(entries, samples) if variant.votes == 1 or vote(task, [sample])[0] == winner)
    latencies = [entry["latency_s"] for entry in entries if "latency_s" in entry]
    return Answer(
        text=winner, samples=tuple(samples), agreement=agreement,
        prompt_tokens=entries[0]["prompt_tokens"],
        latency_s=sum(latencies) if len(latencies) == len(entries) else None,
        started=min((entry["started"] for entry in entries if "started" in entry), default=None),
        finished=max((entry["finished"] for entry in entries if "finished" in entry), default=None),
        logprob=chosen.get("logprob"), tokens=tuple(chosen["tokens"]) if chosen.get("tokens") else None,
        top_logprobs=chosen.get("top_logprobs"),
    )


def teacher_name(teacher: Endpoint, variant: TeacherVariant) -> str:
    """What a labelled row records as its teacher: the endpoint, and the variant unless it is the task's own prompt."""
    return teacher.identity if not variant.changes() else f"{teacher.identity} (teacher variant {variant.name})"


def label(
    rows: list[Row], task: Task, teacher: Endpoint, cache_path: Path, *, relabel: bool = False, top_k: int = 0,
    variant: TeacherVariant = TeacherVariant(), pool: ShotPool | None = None,
) -> tuple[list[Row], LabellingReport]:
    """Rows with ``output`` set to the teacher's answer under ``variant`` (rows that have one are kept unless ``relabel``).

    With ``top_k`` > 0, rows without the teacher's top-k (``teacher_top_logprobs``) are asked too.
    """
    todo = [
        row for row in rows
        if relabel or row.output is None or (top_k and row.teacher_top_logprobs is None)
    ]
    found, cached, requested = ask(todo, task, teacher, cache_path, variant, pool, top_k)
    answers = {row.id: answer for row, answer in zip(todo, found)}
    name = teacher_name(teacher, variant)

    labelled, failed, prompt_tokens = [], 0, []
    for row in rows:
        answer = answers.get(row.id)
        if answer is None:
            labelled.append(row)
            continue
        fresh = replace(row, **dict.fromkeys(TEACHER_FIELDS))
        if answer.error is not None:
            failed += 1
            labelled.append(replace(fresh, output=None, label_error=answer.error))
            continue
        prompt_tokens.append(answer.prompt_tokens)
        labelled.append(replace(
            fresh,
            output=answer.text,
            teacher=name,
            teacher_logprob=answer.logprob,
            teacher_tokens=answer.tokens,
            teacher_top_logprobs=answer.top_logprobs if top_k else None,
            teacher_samples=answer.samples if variant.votes > 1 else row.teacher_samples,
        ))
    mean_tokens = sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else 0.0
    return labelled, LabellingReport(len(rows), cached, requested, failed, mean_tokens)
