"""The network side of curation: teacher self-consistency samples and judge scores.

:func:`sample_teacher` asks the teacher ``k`` more times per training row, at a temperature
above zero, and records the answers as ``teacher_samples``; :func:`judge` asks a judge endpoint
to score each row's output and records ``judge_score`` (with ``judge_output``, the output it
scored). The curation steps that use them (:func:`training.curation.self_consistency`,
:func:`training.curation.rank`) are pure.

Answers go to an append-only JSONL cache like the labelling cache, each line flushed as it
arrives, so an interrupted stage resumes where it stopped and a re-run asks nothing. A sample's
key is (endpoint, prompt, generation settings, sample index): the endpoint protocol exposes no
sampling seed here, so the samples are unseeded draws, made reproducible by the cache rather
than by the server. A row whose request fails for good gets ``teacher_samples_error`` /
``judge_error`` and no samples / score; curation then drops it with its reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from training.config import SelfConsistencyConfig
from training.endpoint import Endpoint, EndpointError, bounded_map
from training.task import Generation, Task

# The judge answers with a number; a few tokens are enough and greedy decoding keeps it stable.
JUDGE_GENERATION = Generation(max_new_tokens=8, stop=["\n"], temperature=0.0)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class StageReport:
    """Rows asked about, requests answered from the cache or anew, and rows that failed."""

    rows: int
    cached: int
    requested: int
    failed: int


def sample_teacher(
    rows: list[dict], task: Task, teacher: Endpoint, settings: SelfConsistencyConfig, cache_path: Path, only: set[str]
) -> tuple[list[dict], StageReport]:
    """Rows whose id is in ``only`` get ``teacher_samples``: ``settings.samples`` answers of the
    teacher's prompt at ``settings.temperature``; the other rows are returned unchanged."""
    generation = task.generation.model_copy(update={"temperature": settings.temperature})
    todo = [row for row in rows if row["id"] in only]
    jobs = []
    for row in todo:
        prompt = task.teacher_prompt(row["inputs"])
        jobs += [(_key(teacher, prompt, generation, index), prompt) for index in range(settings.samples)]
    answers, cached = _ask_all(teacher, jobs, generation, cache_path)

    by_row = {row["id"]: answers[position * settings.samples : (position + 1) * settings.samples] for position, row in enumerate(todo)}
    sampled, failed = [], 0
    for row in rows:
        if row["id"] not in by_row:
            sampled.append(row)
            continue
        row = {key: value for key, value in row.items() if key not in ("teacher_samples", "teacher_samples_error")}
        errors = [answer["error"] for answer in by_row[row["id"]] if "error" in answer]
        if errors:
            failed += 1
            sampled.append({**row, "teacher_samples_error": errors[0]})
        else:
            sampled.append({**row, "teacher_samples": [answer["text"].strip() for answer in by_row[row["id"]]]})
    return sampled, StageReport(len(todo), cached, len(jobs) - cached, failed)


def judge(rows: list[dict], task: Task, judge_endpoint: Endpoint, template: str, cache_path: Path, outputs: dict[str, str]) -> tuple[list[dict], StageReport]:
    """Rows whose id is in ``outputs`` get ``judge_score`` for that output (the number the judge
    answers to ``template`` rendered with the row's ``{input}`` and the ``{output}``) and
    ``judge_output``; the other rows are returned unchanged."""
    todo = [row for row in rows if row["id"] in outputs]
    jobs = []
    for row in todo:
        prompt = render_judge_prompt(template, task.input_text(row["inputs"]), outputs[row["id"]])
        jobs.append((_key(judge_endpoint, prompt, JUDGE_GENERATION, 0), prompt))
    answers, cached = _ask_all(judge_endpoint, jobs, JUDGE_GENERATION, cache_path)

    by_row = {row["id"]: answer for row, answer in zip(todo, answers)}
    judged, failed = [], 0
    for row in rows:
        answer = by_row.get(row["id"])
        if answer is None:
            judged.append(row)
            continue
        row = {key: value for key, value in row.items() if key not in ("judge_score", "judge_output", "judge_error")}
        score = parse_score(answer.get("text", ""))
        if "error" in answer or score is None:
            failed += 1
            error = answer.get("error") or f"no number in the judge's answer {answer['text']!r}"
            judged.append({**row, "judge_score": None, "judge_output": outputs[row["id"]], "judge_error": error})
        else:
            judged.append({**row, "judge_score": score, "judge_output": outputs[row["id"]]})
    return judged, StageReport(len(todo), cached, len(jobs) - cached, failed)


def render_judge_prompt(template: str, input_text: str, output: str) -> str:
    """``template`` with ``{input}`` and ``{output}`` filled in (other braces are left as they are)."""
    values = {"input": input_text, "output": output}
    return re.sub(r"\{(input|output)\}", lambda match: values[match.group(1)], template)


def parse_score(text: str) -> float | None:
    """The first number in a judge's answer, or None."""
    match = _NUMBER.search(text or "")
    return float(match.group()) if match else None


def _ask_all(endpoint: Endpoint, jobs: list[tuple[str, str]], generation: Generation, cache_path: Path) -> tuple[list[dict], int]:
    """Each (key, prompt) job's answer, from the cache or the endpoint; and how many were cached."""
    cache = _read_cache(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    cached = sum(1 for key, _ in jobs if key in cache)
    with cache_path.open("a") as sink:
        if cache_path.stat().st_size and not cache_path.read_bytes().endswith(b"\n"):
            sink.write("\n")  # end a torn line so the next entry starts clean

        def ask(job: tuple[str, str]) -> dict:
            key, prompt = job
            if key in cache:
                return cache[key]
            try:
                completion = endpoint.complete(prompt, generation)
            except EndpointError as error:
                return {"key": key, "error": str(error)}
            entry = {"key": key, "text": completion.text}
            with lock:
                sink.write(json.dumps(entry) + "\n")
                sink.flush()
            return entry

        answers = list(bounded_map(ask, jobs, endpoint.config.concurrency))
    return answers, cached


def _key(endpoint: Endpoint, prompt: str, generation: Generation, index: int) -> str:
    payload = json.dumps([endpoint.identity, prompt, generation.model_dump(), index], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _read_cache(path: Path) -> dict[str, dict]:
    """Cached answers by key; a torn last line (the process was killed mid-write) is ignored."""
    cache: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            cache[entry["key"]] = entry
    return cache
