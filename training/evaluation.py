"""Evaluation: the task's criteria, scored with 95% intervals, against any endpoint and adapter.

Metrics are pure functions of (references, predictions). Proportions (accuracy, exact match,
regex match, JSON validity) carry a Wilson score interval; macro-F1 a seeded percentile
bootstrap; the optional LLM-judge score (the task's ``judge`` criterion, asked of any endpoint)
is a mean with a Student-t interval over the rows the judge scored. :func:`evaluate` asks an
endpoint (lorax-client or openai client) for every row with the student's or the teacher's
prompt, and reports each metric with prompt tokens per request and latency, so a student and
its teacher are compared on the same gold rows.
"""

from __future__ import annotations

import functools
import json
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from training import judge as judging
from training.endpoint import Completion, Endpoint, EndpointError, bounded_map
from training.row import Row
from training.task import Task

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Metric:
    """One metric's value with its 95% interval over ``n`` rows and how the interval was made."""

    name: str
    value: float
    low: float
    high: float
    n: int
    interval: str


@dataclass(frozen=True)
class EvalReport:
    """Scores of one endpoint+adapter+prompt on a gold set, with cost and the raw predictions."""

    endpoint: str
    prompt: str
    metrics: list[Metric]
    rows: int
    failed_requests: int
    mean_prompt_tokens: float
    latency_p50_s: float
    latency_p95_s: float
    predictions: list[dict]

    def metric(self, name: str) -> Metric:
        return next(metric for metric in self.metrics if metric.name == name)

    def to_dict(self) -> dict:
        return asdict(self)


# --- pure statistics -----------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when ``n`` is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n successes the bounds are exactly 0 or 1; floating point would leave a residue.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def macro_f1(references: Sequence[Any], predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Unweighted mean of per-label F1 (a label never predicted nor present scores 0)."""
    scores = []
    for label in labels:
        tp = sum(1 for r, p in zip(references, predictions) if r == label and p == label)
        fp = sum(1 for r, p in zip(references, predictions) if r != label and p == label)
        fn = sum(1 for r, p in zip(references, predictions) if r == label and p != label)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def bootstrap_interval(
    statistic: Callable[[Sequence[Any], Sequence[Any]], float],
    references: Sequence[Any],
    predictions: Sequence[Any],
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of ``statistic`` over paired rows (seeded, so reproducible)."""
    n = len(references)
    if n == 0:
        return 0.0, 1.0
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        values.append(statistic([references[i] for i in picks], [predictions[i] for i in picks]))
    values.sort()
    return values[int(0.025 * (resamples - 1))], values[int(math.ceil(0.975 * (resamples - 1)))]


def proportion(name: str, hits: Sequence[bool]) -> Metric:
    """A proportion metric with its Wilson interval."""
    k, n = sum(hits), len(hits)
    low, high = wilson_interval(k, n)
    return Metric(name, k / n if n else 0.0, low, high, n, "wilson")


def mean_interval(name: str, values: Sequence[float]) -> Metric:
    """The mean of ``values`` with its 95% Student-t interval (none for fewer than two values)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return Metric(name, float("nan"), float("nan"), float("nan"), 0, "t")
    mean = statistics.fmean(values)
    if n < 2:
        return Metric(name, mean, float("nan"), float("nan"), n, "t")
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Metric(name, mean, mean - half, mean + half, n, "t")


def score(task: Task, references: Sequence[str], outputs: Sequence[str | None]) -> list[Metric]:
    """Every metric of ``task`` for raw ``outputs`` against reference outputs (None = failed request)."""
    parsed = [task.parse(output or "") for output in outputs]
    results = []
    for name in task.metric_names:
        if name == "accuracy" or (name == "exact_match" and task.output.type == "labels"):
            results.append(proportion(name, [p.value == task.parse(r).value for p, r in zip(parsed, references)]))
        elif name == "macro_f1":
            statistic = functools.partial(macro_f1, labels=task.output.labels)
            gold = [task.parse(r).value for r in references]
            predicted = [p.value for p in parsed]
            low, high = bootstrap_interval(statistic, gold, predicted)
            results.append(Metric(name, statistic(gold, predicted), low, high, len(gold), "bootstrap"))
        elif name == "exact_match" and task.output.type == "json":
            results.append(proportion(name, [p.code == "ok" and p.value == _json_or_none(r) for p, r in zip(parsed, references)]))
        elif name == "exact_match":
            results.append(proportion(name, [(o or "").strip() == r.strip() for o, r in zip(outputs, references)]))
        else:  # regex_match, json_valid: the output parses under the task's format
            results.append(proportion(name, [p.code == "ok" for p in parsed]))
    return results


# --- against an endpoint -------------------------------------------------------------------


def judge_scores(task: Task, rows: list[Row], references: Sequence[str], outputs: Sequence[str | None], judge: Endpoint) -> list[float | None]:
    """The judge's score of each output under the task's ``judge`` criterion; None where the request
    failed, the answer has no number, or the number is off the criterion's scale."""
    criterion = task.judge
    if criterion is None:
        raise ValueError(f"task {task.name!r} has no judge criterion; add judge: {{prompt: ..., scale: [1, 5]}} to the task file, or leave out the judge endpoint")
    low, high = criterion.scale

    def ask(item: tuple[Row, str, str | None]) -> float | None:
        row, reference, output = item
        if output is None:
            return None
        prompt = judging.render_prompt(criterion.prompt, task.input_text(row.inputs), output.strip(), reference or "")
        try:
            value = judging.parse_score(judge.complete(prompt, judging.GENERATION).text)
        except EndpointError:
            return None
        return value if value is not None and low <= value <= high else None

    return list(bounded_map(ask, list(zip(rows, references, outputs)), judge.config.concurrency))


def evaluate(
    task: Task, rows: list[Row], endpoint: Endpoint, prompt: Literal["student", "teacher"] = "student", judge: Endpoint | None = None
) -> EvalReport:
    """Ask ``endpoint`` for every row (``prompt`` picks the task's template) and score the answers (``report``)."""
    render = task.student_prompt if prompt == "student" else task.teacher_prompt

    def ask(row: Row):
        try:
            return endpoint.complete(render(row.inputs), task.generation)
        except EndpointError:
            return None

    return report(task, rows, endpoint.identity, prompt, list(bounded_map(ask, rows, endpoint.config.concurrency)), judge)


def report(
    task: Task, rows: list[Row], identity: str, prompt: str, completions: Sequence[Completion | None], judge: Endpoint | None = None
) -> EvalReport:
    """Score ``completions`` (one per row, None where the request failed) against each row's gold
    (or, when a row has none, the teacher's output); with ``judge``, also the task's judge criterion."""
    references = [row.gold or row.output for row in rows]
    outputs = [completion.text if completion else None for completion in completions]
    answered = [completion for completion in completions if completion]
    latencies = sorted(completion.latency_s for completion in answered)
    predictions = [
        {"id": row.id, "inputs": row.inputs, "reference": reference, "output": output, "parsed": task.parse(output or "").value}
        for row, reference, output in zip(rows, references, outputs)
    ]
    metrics = score(task, references, outputs)
    if judge is not None:
        scores = judge_scores(task, rows, references, outputs, judge)
        for prediction, value in zip(predictions, scores):
            prediction["judge_score"] = value
        metrics.append(mean_interval("judge", [value for value in scores if value is not None]))
    return EvalReport(
        endpoint=identity,
        prompt=prompt,
        metrics=metrics,
        rows=len(rows),
        failed_requests=len(rows) - len(answered),
        mean_prompt_tokens=statistics.fmean(c.prompt_tokens for c in answered) if answered else 0.0,
        latency_p50_s=_quantile(latencies, 0.5),
        latency_p95_s=_quantile(latencies, 0.95),
        predictions=predictions,
    )


def report_markdown(task: Task, reports: list[EvalReport]) -> str:
    """A side-by-side table of reports (e.g. the student and its teacher) on the same rows."""
    names = task.metric_names + (["judge"] if any(metric.name == "judge" for report in reports for metric in report.metrics) else [])
    header = ["endpoint", "prompt", *[f"{name} [95% CI]" for name in names], "prompt tokens/req", "p50 latency s", "failed"]
    lines = [f"# Evaluation: {task.name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for report in reports:
        cells = [f"`{report.endpoint}`", report.prompt]
        for name in names:
            metric = next((metric for metric in report.metrics if metric.name == name), None)
            cells.append("—" if metric is None else f"{metric.value:.3f} [{metric.low:.3f}, {metric.high:.3f}] (n={metric.n})")
        cells += [f"{report.mean_prompt_tokens:.1f}", f"{report.latency_p50_s:.3f}", str(report.failed_requests)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
