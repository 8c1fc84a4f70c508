"""Metrics and their intervals: pure functions checked against known values."""

from __future__ import annotations

import pytest

from training.evaluation import bootstrap_interval, macro_f1, score, wilson_interval
from training.task import load_task


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson_interval(81, 263)  # Wilson (1927) / Newcombe (1998) example
    assert low == pytest.approx(0.2553, abs=1e-4)
    assert high == pytest.approx(0.3662, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0


def test_macro_f1_averages_per_label_f1():
    references = ["a", "a", "b", "c"]
    predictions = ["a", "b", "b", "b"]
    # a: tp1 fp0 fn1 -> 2/3; b: tp1 fp2 fn0 -> 0.5; c: 0
    assert macro_f1(references, predictions, ["a", "b", "c"]) == pytest.approx((2 / 3 + 0.5 + 0) / 3)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    references = ["a"] * 50 + ["b"] * 50
    predictions = ["a"] * 40 + ["b"] * 10 + ["b"] * 45 + ["a"] * 5
    def accuracy(r, p):
        return sum(x == y for x, y in zip(r, p)) / len(r)
    first = bootstrap_interval(accuracy, references, predictions, resamples=300, seed=1)
    assert first == bootstrap_interval(accuracy, references, predictions, resamples=300, seed=1)
    assert first[0] < 0.85 < first[1]


def test_score_parses_outputs_and_counts_failed_requests_as_wrong():
    task = load_task("demo")
    metrics = {m.name: m for m in score(task, ["positive", "negative", "neutral", "positive"], [" positive", "Negative\n", "banana", None])}
    assert metrics["accuracy"].value == 0.5 and metrics["accuracy"].n == 4
    assert metrics["accuracy"].interval == "wilson"
    assert metrics["macro_f1"].interval == "bootstrap"
    assert 0.0 <= metrics["macro_f1"].low <= metrics["macro_f1"].value <= metrics["macro_f1"].high <= 1.0
