"""A resumable cache of endpoint answers: an append-only JSONL file, one entry per line.

Labelling, self-consistency sampling and judge scoring all ask an endpoint many questions. Each
answer is written and flushed as it arrives, so an interrupted run resumes where it stopped and
a re-run asks nothing. A torn last line (the process was killed mid-write) is ignored, and the
next entry starts on a fresh line. Failed requests are returned as ``{"key", "error"}`` and
never cached, so the next run asks them again.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path

from training.endpoint import EndpointError, bounded_map

#: one question: its cache key, and a call that asks the endpoint and returns the entry's fields
Job = tuple[str, Callable[[], dict]]


def cache_key(*parts) -> str:
    """A stable key for an answer: the sha256 of ``parts`` as canonical JSON."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()


def ask_all(jobs: list[Job], cache_path: Path, concurrency: int) -> tuple[list[dict], int]:
    """Every job's entry, in order, from the cache or by asking (at most ``concurrency`` at once);
    and how many were not asked anew. Jobs sharing a key are asked once and share its answer, so a
    sampled answer reads the same on a re-run."""
    cache = read(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    unique = list({key: (key, ask) for key, ask in jobs}.values())
    cached = len(jobs) - sum(1 for key, _ in unique if key not in cache)  # answers not asked anew
    with cache_path.open("a") as sink:
        if cache_path.stat().st_size and not cache_path.read_bytes().endswith(b"\n"):
            sink.write("\n")

        def answer(job: Job) -> dict:
            key, ask = job
            if key in cache:
                return cache[key]
            try:
                entry = {"key": key, **ask()}
            except EndpointError as error:
                return {"key": key, "error": str(error)}
            with lock:
                sink.write(json.dumps(entry) + "\n")
                sink.flush()
            return entry

        answers = dict(zip((key for key, _ in unique), bounded_map(answer, unique, concurrency)))
    return [answers[key] for key, _ in jobs], cached


def read(path: Path) -> dict[str, dict]:
    """Cached entries by key (an unreadable line, such as a torn last one, is skipped)."""
    cache: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            cache[entry["key"]] = entry
    return cache
