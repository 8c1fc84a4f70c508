"""Teacher labelling: run the teacher's prompt over rows and record its answers as outputs.

Answers go to a resumable cache (:mod:`training.answer_cache`) keyed by (teacher, prompt, generation settings, and the
top-k asked for, if any), each line flushed as it arrives, so an interrupted run resumes where it
stopped and a re-run costs nothing. A row whose request fails for good keeps ``output`` None with
``label_error`` set; curation then drops it as ``missing_output``.

Each labelled row records ``teacher_logprob`` (the summed log-probability of the teacher's
generated tokens) and ``teacher_tokens`` (their ids) when the endpoint reports them (LoRAX
always; OpenAI ids only with top-k). Asked for ``top_k`` > 0 (logit distillation), rows also get
``teacher_top_logprobs``: per generated token, the teacher's ``top_k`` most likely
``[id, logprob]`` pairs, best first.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

from training import answer_cache
from training.endpoint import Endpoint
from training.row import Row
from training.task import Task


@dataclass(frozen=True)
class LabellingReport:
    """How many rows were asked, answered from the cache, answered anew, and failed."""

    rows: int
    cached: int
    requested: int
    failed: int
    mean_prompt_tokens: float


#: what a teacher's answer adds to a row besides ``output``; a new answer replaces all of them
TEACHER_FIELDS = ("teacher", "teacher_logprob", "teacher_tokens", "teacher_top_logprobs", "label_error")


def label(
    rows: list[Row], task: Task, teacher: Endpoint, cache_path: Path, *, relabel: bool = False, top_k: int = 0
) -> tuple[list[Row], LabellingReport]:
    """Rows with ``output`` set to the teacher's answer (rows that have one are kept unless ``relabel``).

    With ``top_k`` > 0, rows without the teacher's top-k (``teacher_top_logprobs``) are asked too.
    """
    todo = [
        row for row in rows
        if relabel or row.output is None or (top_k and row.teacher_top_logprobs is None)
    ]

    def ask(row: Row) -> dict:
        completion = teacher.complete(task.teacher_prompt(row.inputs), task.generation, top_k=top_k)
        entry = {"text": completion.text, "prompt_tokens": completion.prompt_tokens}
        if completion.logprob is not None:
            entry["logprob"] = completion.logprob
        if completion.token_ids:
            entry["tokens"] = list(completion.token_ids)
        if top_k:
            entry["top_logprobs"] = [[[i, v] for i, v in top.items()] for top in completion.top_logprobs]
        return entry

    jobs = [(_key(teacher, task, row, top_k), functools.partial(ask, row)) for row in todo]
    entries, cached = answer_cache.ask_all(jobs, cache_path, teacher.config.concurrency)
    answers = {row.id: entry for row, entry in zip(todo, entries)}

    labelled, failed, prompt_tokens = [], 0, []
    for row in rows:
        answer = answers.get(row.id)
        if answer is None:
            labelled.append(row)
            continue
        fresh = replace(row, **dict.fromkeys(TEACHER_FIELDS))
        if "error" in answer:
            failed += 1
            labelled.append(replace(fresh, output=None, label_error=answer["error"]))
            continue
        prompt_tokens.append(answer["prompt_tokens"])
        labelled.append(replace(
            fresh,
            output=answer["text"].strip(),
            teacher=teacher.identity,
            teacher_logprob=answer.get("logprob"),
            teacher_tokens=answer.get("tokens"),
            teacher_top_logprobs=answer["top_logprobs"] if top_k else None,
        ))
    mean_tokens = sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else 0.0
    return labelled, LabellingReport(len(rows), cached, len(todo) - cached, failed, mean_tokens)


def _key(teacher: Endpoint, task: Task, row: Row, top_k: int) -> str:
    """The cache key; ``top_k`` joins it only when asked for, so plain answers keep their keys."""
    parts = [teacher.identity, task.teacher_prompt(row.inputs), task.generation.model_dump()]
    if top_k:
        parts.append({"top_k": top_k})
    return answer_cache.cache_key(*parts)
