"""Teacher labelling: run the teacher's prompt over rows and record its answers as outputs.

Answers go to an append-only JSONL cache keyed by (teacher, prompt, generation settings), each
line flushed as it arrives, so an interrupted run resumes where it stopped and a re-run costs
nothing. A row whose request fails for good keeps ``output`` None with ``label_error`` set;
curation then drops it as ``missing_output``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from training.endpoint import Endpoint, EndpointError, bounded_map
from training.task import Task


@dataclass(frozen=True)
class LabellingReport:
    """How many rows were asked, answered from the cache, answered anew, and failed."""

    rows: int
    cached: int
    requested: int
    failed: int
    mean_prompt_tokens: float


def label(rows: list[dict], task: Task, teacher: Endpoint, cache_path: Path, *, relabel: bool = False) -> tuple[list[dict], LabellingReport]:
    """Rows with ``output`` set to the teacher's answer (rows that have one are kept unless ``relabel``)."""
    cache = _read_cache(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    todo = [row for row in rows if relabel or row.get("output") is None]
    cached = sum(1 for row in todo if _key(teacher, task, row) in cache)

    with cache_path.open("a") as sink:
        if cache_path.stat().st_size and not cache_path.read_bytes().endswith(b"\n"):
            sink.write("\n")  # end a torn line so the next entry starts clean

        def ask(row: dict) -> dict:
            key = _key(teacher, task, row)
            if key in cache:
                return cache[key]
            try:
                completion = teacher.complete(task.teacher_prompt(row["inputs"]), task.generation)
            except EndpointError as error:
                return {"key": key, "error": str(error)}
            entry = {"key": key, "text": completion.text, "prompt_tokens": completion.prompt_tokens}
            with lock:
                sink.write(json.dumps(entry) + "\n")
                sink.flush()
            return entry

        answers = {row["id"]: answer for row, answer in zip(todo, bounded_map(ask, todo, teacher.config.concurrency))}

    labelled, failed, prompt_tokens = [], 0, []
    for row in rows:
        answer = answers.get(row["id"])
        if answer is None:
            labelled.append(row)
        elif "error" in answer:
            failed += 1
            labelled.append({**row, "output": None, "label_error": answer["error"]})
        else:
            prompt_tokens.append(answer["prompt_tokens"])
            labelled.append({**row, "output": answer["text"].strip(), "teacher": teacher.identity})
    mean_tokens = sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else 0.0
    return labelled, LabellingReport(len(rows), cached, len(todo) - cached, failed, mean_tokens)


def _key(teacher: Endpoint, task: Task, row: dict) -> str:
    payload = json.dumps([teacher.identity, task.teacher_prompt(row["inputs"]), task.generation.model_dump()], sort_keys=True)
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
