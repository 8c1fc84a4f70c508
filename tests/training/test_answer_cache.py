"""The answer cache: jobs sharing a key are asked once, and a re-run reads the same answers."""

from __future__ import annotations

import itertools

from training import answer_cache


def test_a_key_asked_twice_in_one_run_is_asked_once_and_reads_the_same_on_a_rerun(tmp_path):
    draws = itertools.count()  # a sampled answer: every ask returns something new

    def ask() -> dict:
        return {"text": f"sample {next(draws)}"}

    cache = tmp_path / "cache.jsonl"
    jobs = [("a", ask), ("b", ask), ("a", ask)]
    first, cached = answer_cache.ask_all(jobs, cache, concurrency=3)
    assert cached == 1 and next(draws) == 2  # two questions asked; the repeat shares its answer
    assert first[0] == first[2] and first[0] != first[1]
    again, cached = answer_cache.ask_all(jobs, cache, concurrency=3)
    assert cached == 3 and again == first
    assert len(cache.read_text().splitlines()) == 2
