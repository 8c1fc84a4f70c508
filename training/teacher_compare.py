"""`stillhouse teacher compare`: teacher variants scored on gold rows, the best one marked.

Variants come from a small YAML file (``variants: [{name, base, <one change>}, ...]``) or
``--variant KEY=VALUE`` flags. Each changes exactly ONE thing from its ``base`` (an earlier
variant; by default the current teacher, i.e. the run config's ``teacher_variant`` and
``teacher``): a field of :class:`~training.teacher_variant.TeacherVariant` (``votes`` may bring
its ``vote_temperature``), or the ``endpoint`` (any of url, protocol, model).

Every variant answers the same gold rows (:func:`gold_rows`: the run's test rows with gold, the
task's generator, a labelled file, or the human corrections), through the labelling cache, so a
re-run asks nothing twice. Per variant the report gives accuracy and macro-F1 with their
intervals (:mod:`training.evaluation`), the recall of every label (a label the variant never
answers is flagged), prompt tokens per request, latency and requests per second; it marks the
best variant under the task's primary metric and tests each against the current teacher with an
exact (or, with 25 or more discordant rows, chi-square) McNemar test on the paired rows.
Written to ``runs/<name>/teacher/compare.{json,md,html}``.
"""

from __future__ import annotations

import html
import io
import json
import re
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from training import dataset, evaluation, labelling, shots
from training.config import ConfigError, DataConfig, EndpointConfig, RunConfig
from training.endpoint import Endpoint
from training.row import Row
from training.shots import Selection
from training.task import Task, describe_errors
from training.teacher_variant import CURRENT, TeacherVariant

Say = Callable[[str], None]
_BOLD = re.compile(r"[*][*](.+?)[*][*]")


class VariantError(ValueError):
    """A variants file or flag is invalid; the message names the variant, the field and the fix."""


class EndpointChange(BaseModel):
    """The part of the current teacher's endpoint a variant changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = None
    protocol: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    concurrency: int | None = Field(None, ge=1, le=256)
    timeout_s: float | None = Field(None, gt=0.0)


_VARIANT_FIELDS = tuple(name for name in TeacherVariant.model_fields if name != "name")


class VariantSpec(BaseModel):
    """One variant as written: its name, the variant it starts from, and the one thing it changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,63}$")
    base: str = CURRENT  # an earlier variant's name, or current (the run's teacher as configured)
    template: str | None = None
    instruction: str | None = None
    shots: int | None = Field(None, ge=0, le=64)
    selection: Selection | None = None
    shot_template: str | None = None
    constrain: bool | None = None
    temperature: float | None = Field(None, ge=0.0)
    votes: int | None = Field(None, ge=1, le=32)
    vote_temperature: float | None = Field(None, gt=0.0)
    seed: int | None = None
    endpoint: EndpointChange | None = None

    @model_validator(mode="after")
    def _one_change(self) -> "VariantSpec":
        changed = sorted(self.model_fields_set - {"name", "base"})
        if "votes" in changed and "vote_temperature" in changed:
            changed.remove("vote_temperature")  # the temperature the votes are drawn at is part of voting
        if len(changed) != 1:
            what = f"changes {', '.join(changed)}" if changed else "changes nothing"
            raise ValueError(f"variant {self.name!r} {what}; a variant changes ONE thing from its base "
                             f"({', '.join(_VARIANT_FIELDS)} or endpoint): split it into variants that build on each other with base:")
        return self

    @property
    def change(self) -> str:
        """What this variant changes, as ``field=value``."""
        fields = self.model_dump(exclude={"name", "base"}, exclude_unset=True)
        return ", ".join(f"{key}={json.dumps(value) if isinstance(value, dict) else value}" for key, value in fields.items())


class VariantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variants: list[VariantSpec] = Field(min_length=1)


@dataclass(frozen=True)
class Candidate:
    """A variant resolved against the current teacher: how it asks and whom."""

    name: str
    base: str
    change: str
    variant: TeacherVariant
    endpoint: EndpointConfig


def load_variants(path: Path) -> list[VariantSpec]:
    """The variants in a YAML file, validated; every problem reported at once with its field."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise VariantError(f"{path}: cannot read the variants file ({error})") from None
    if isinstance(data, list):
        data = {"variants": data}
    try:
        return VariantsFile.model_validate(data).variants
    except ValidationError as error:
        raise VariantError(f"{path}: {describe_errors(error)}") from None


def parse_flag(text: str) -> VariantSpec:
    """A ``--variant KEY=VALUE`` flag (``endpoint.model=X`` for an endpoint field) as a variant named after it."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise VariantError(f"--variant {text!r}: write KEY=VALUE, e.g. shots=6, selection=balanced, constrain=true, endpoint.model=my-adapter")
    parsed = yaml.safe_load(value) if value else ""
    field = {"endpoint": {key.removeprefix("endpoint."): parsed}} if key.startswith("endpoint.") else {key: parsed}
    name = "".join(ch if ch.isalnum() or ch in "._=+-" else "-" for ch in text)[:64].strip("-") or "variant"
    try:
        return VariantSpec.model_validate({"name": name, **field})
    except ValidationError as error:
        raise VariantError(f"--variant {text!r}: {describe_errors(error)}") from None


def resolve(specs: list[VariantSpec], current: TeacherVariant, teacher: EndpointConfig, task: Task) -> list[Candidate]:
    """The current teacher first, then every variant applied to its base; problems name the variant and field."""
    resolved = {CURRENT: Candidate(current.name, "—", "—", current, teacher)}
    problems = []
    for spec in specs:
        if spec.name in resolved:
            problems.append(f"variant {spec.name!r}: the name is taken; give every variant its own name (current is the run's teacher)")
            continue
        base = resolved.get(spec.base)
        if base is None:
            problems.append(f"variant {spec.name!r}: base {spec.base!r} is not an earlier variant; use current or a name defined above it")
            continue
        endpoint = base.endpoint
        updates = spec.model_dump(include=set(_VARIANT_FIELDS), exclude_unset=True)
        if spec.endpoint is not None:
            endpoint_updates = spec.endpoint.model_dump(exclude_none=True)
            try:
                endpoint = EndpointConfig.model_validate({**endpoint.model_dump(), **endpoint_updates})
            except ValidationError as error:
                problems.append(f"variant {spec.name!r}: endpoint {describe_errors(error)}")
                continue
        try:
            variant = TeacherVariant.model_validate({**base.variant.model_dump(), **updates, "name": spec.name})
        except ValidationError as error:
            problems.append(f"variant {spec.name!r}: {describe_errors(error)}")
            continue
        problems += [f"variant {spec.name!r}: {problem}" for problem in variant.problems(task)]
        resolved[spec.name] = Candidate(spec.name, spec.base, spec.change, variant, endpoint)
    if problems:
        raise VariantError("\n".join(problems))
    return list(resolved.values())


# --- gold rows -----------------------------------------------------------------------------


def gold_rows(config: RunConfig, task: Task, source: str, limit: int | None = None) -> tuple[list[Row], list[Row]]:
    """(gold rows to score on, rows that may serve as shots) for ``source``.

    ``run``: the run's rows (``data/rows.jsonl``) with gold in the test split; ``generator``: the
    task generator's held-out rows; ``corrections``: the run's rows a human corrected; a .jsonl /
    .csv path: its rows with gold. Shots come from the run's (or else the generator's) gold
    training rows, never from the rows scored.
    """
    from training import corrections

    rows_file = config.run_dir / "data" / "rows.jsonl"
    run_rows = dataset.read_rows(rows_file) if rows_file.is_file() else None
    if source == "generator":
        generated = dataset.load_rows(task, config.data.model_copy(update={"source": "generator"}))
        gold = [row for row in generated if row.split == "test" and row.gold]
        candidates = run_rows if run_rows is not None else generated
    elif source in ("run", "corrections"):
        if run_rows is None:
            raise ConfigError(f"{rows_file}: no rows; run `stillhouse data build --name {config.name}` first, or pass --gold generator|FILE")
        if source == "run":
            assigned = dataset.assign_splits(run_rows, task, config.data.test_fraction, config.data.seed)
            gold = [row for row in assigned if row.split == "test" and row.gold]
        else:
            corrected = corrections.corrected_ids(config.run_dir / "data")
            gold = [row for row in run_rows if row.id in corrected and row.gold]
            if not gold:
                raise ConfigError(f"{config.run_dir / 'data'}: no corrections imported; run `stillhouse data corrections import FILE` first")
        candidates = run_rows
    else:
        path = Path(source)
        gold = [row for row in dataset.load_rows(task, DataConfig(source=str(path), gold_field=config.data.gold_field)) if row.gold]
        candidates = run_rows or []
    if not gold:
        raise ConfigError(f"--gold {source}: no rows with a gold label; pass --gold generator, a labelled .jsonl/.csv file, or corrections")
    gold = gold[:limit]
    scored = {row.id for row in gold} | {task.input_text(row.inputs) for row in gold}
    pool = [row for row in shots.pool_rows(candidates, task, config.data) if row.id not in scored and task.input_text(row.inputs) not in scored]
    return gold, pool


# --- scoring -------------------------------------------------------------------------------


def mcnemar(current: list[bool], other: list[bool]) -> dict:
    """McNemar's test of two paired correctness vectors (exact binomial below 25 discordant rows)."""
    from statsmodels.stats.contingency_tables import mcnemar as test

    both = sum(a and b for a, b in zip(current, other))
    only_current = sum(a and not b for a, b in zip(current, other))
    only_other = sum(b and not a for a, b in zip(current, other))
    neither = len(current) - both - only_current - only_other
    exact = only_current + only_other < 25
    result = test([[both, only_current], [only_other, neither]], exact=exact, correction=True)
    return {"only_current_right": only_current, "only_variant_right": only_other, "exact": exact,
            "statistic": float(result.statistic), "p_value": float(result.pvalue)}


def score_variant(task: Task, gold: list[Row], answers: list[labelling.Answer]) -> dict:
    """Metrics, per-label recall, cost and speed of one variant's answers on the gold rows."""
    outputs = [answer.text for answer in answers]
    references = [row.gold for row in gold]
    metrics = evaluation.score(task, references, outputs)
    predicted = [task.parse(output or "").value for output in outputs]
    truth = [task.parse(reference).value for reference in references]
    labels = list(task.output.labels) if task.output.type == "labels" else []
    recall = {}
    for label in labels:
        hits = [p == label for p, t in zip(predicted, truth) if t == label]
        metric = evaluation.proportion(f"recall:{label}", hits)
        recall[label] = {"value": metric.value, "low": metric.low, "high": metric.high, "n": metric.n,
                         "answered": sum(1 for p in predicted if p == label)}
    answered = [answer for answer in answers if answer.error is None]
    latencies = sorted(answer.latency_s for answer in answered if answer.latency_s is not None)
    starts = [answer.started for answer in answered if answer.started is not None]
    ends = [answer.finished for answer in answered if answer.finished is not None]
    span = max(ends) - min(starts) if starts and ends else 0.0
    return {
        "metrics": [asdict(metric) for metric in metrics],
        "recall": recall,
        "never_answers": [label for label in labels if recall[label]["answered"] == 0],
        "correct": [p is not None and p == t for p, t in zip(predicted, truth)],
        "unparsed": sum(1 for answer, p in zip(answers, predicted) if answer.error is None and p is None),
        "failed": len(answers) - len(answered),
        "first_error": next((answer.error for answer in answers if answer.error is not None), None),
        "prompt_tokens": statistics.fmean(answer.prompt_tokens for answer in answered) if answered else 0.0,
        "latency_p50_s": latencies[len(latencies) // 2] if latencies else None,
        "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else None,
        "requests_per_s": len(answered) * len(answered[0].samples or (None,)) / span if answered and span > 0 else None,
        "predictions": [{"id": row.id, "gold": t, "answer": output, "parsed": p, "agreement": answer.agreement}
                        for row, t, output, p, answer in zip(gold, truth, outputs, predicted, answers)],
    }


def compare(config: RunConfig, task: Task, candidates: list[Candidate], gold: list[Row], pool_rows: list[Row], gold_source: str, say: Say) -> dict:
    """Ask every candidate for every gold row (through the run's teacher cache) and score them; the report as a dict."""
    cache = config.run_dir / "data" / "teacher_cache.jsonl"
    results = []
    for candidate in candidates:
        pool = shots.ShotPool(pool_rows, task, candidate.variant.seed) if candidate.variant.uses_shots else None
        if pool is not None and not len(pool):
            raise ConfigError(f"variant {candidate.name!r} shows gold shots but no gold training row is left to show; "
                              "build the run from a source with gold labels, or score on --gold generator")
        answers, cached, requested = labelling.ask(gold, task, Endpoint(candidate.endpoint), cache, candidate.variant, pool)
        scored = score_variant(task, gold, answers)
        say(f"variant {candidate.name}: {cached} answers from the cache, {requested} asked; "
            f"{task.primary_metric} {next(m['value'] for m in scored['metrics'] if m['name'] == task.primary_metric):.3f}")
        results.append({"name": candidate.name, "base": candidate.base, "change": candidate.change,
                        "variant": candidate.variant.model_dump(), "endpoint": Endpoint(candidate.endpoint).identity,
                        "cached": cached, "requested": requested, **scored})
    primary = task.primary_metric
    value = lambda result: next(m["value"] for m in result["metrics"] if m["name"] == primary)  # noqa: E731
    best = max(results, key=lambda result: (value(result), -result["prompt_tokens"], -results.index(result)))
    for result in results[1:]:
        result["mcnemar"] = mcnemar(results[0]["correct"], result["correct"])
    return {"task": task.name, "run": config.name, "gold": gold_source, "rows": len(gold), "pool_rows": len(pool_rows),
            "primary_metric": primary, "current": results[0]["name"], "best": best["name"], "variants": results}


# --- the report ----------------------------------------------------------------------------


def _metric(result: dict, name: str) -> dict | None:
    return next((m for m in result["metrics"] if m["name"] == name), None)


def report_markdown(report: dict) -> str:
    """The comparison table, per-label recall and the paired tests as Markdown."""
    task_metrics = [m["name"] for m in report["variants"][0]["metrics"]]
    labels = list(report["variants"][0]["recall"])
    lines = [f"# Teacher variants: {report['task']} (run {report['run']})", "",
             f"{report['rows']} gold rows ({report['gold']}); shots drawn from {report['pool_rows']} gold training rows. "
             f"Best under {report['primary_metric']}: **{report['best']}** (★). "
             f"McNemar: paired test against the current teacher ({report['current']}) on the same rows.", "",
             "| variant | changes | " + " | ".join(f"{name} [95% CI]" for name in task_metrics)
             + " | " + " | ".join(f"recall {label}" for label in labels)
             + " | prompt tokens/req | p50 latency s | req/s | unparsed | McNemar p (±rows) |",
             "|---|---|" + "---|" * (len(task_metrics) + len(labels) + 5)]
    for result in report["variants"]:
        star = " ★" if result["name"] == report["best"] else ""
        on = f" (on {result['base']})" if result["base"] not in ("—", report["current"]) else ""
        cells = [f"{result['name']}{star}", result["change"] + on]
        for name in task_metrics:
            m = _metric(result, name)
            cells.append(f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]")
        for label in labels:
            r = result["recall"][label]
            flag = " ⚠ never answered" if label in result["never_answers"] else ""
            cells.append(f"{r['value']:.2f} (n={r['n']}){flag}")
        test = result.get("mcnemar")
        cells += [f"{result['prompt_tokens']:.1f}", _number(result["latency_p50_s"], 3), _number(result["requests_per_s"], 1),
                  str(result["unparsed"] + result["failed"]),
                  "—" if test is None else f"{test['p_value']:.3g} (+{test['only_variant_right']} / -{test['only_current_right']})"]
        lines.append("| " + " | ".join(cells) + " |")
    never = [f"{r['name']} never answers {', '.join(r['never_answers'])}" for r in report["variants"] if r["never_answers"]]
    if never:
        lines += ["", "⚠ " + "; ".join(never) + "."]
    failing = [f"{r['name']}: {r['failed']} requests failed ({r['first_error']})" for r in report["variants"] if r["failed"]]
    if failing:
        lines += ["", "⚠ " + "; ".join(failing)]
    return "\n".join(lines) + "\n"


def _number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _svg(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _plots(report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    names = [v["name"] for v in variants]
    task_metrics = [m["name"] for m in variants[0]["metrics"]]
    figure, axes = plt.subplots(1, len(task_metrics), figsize=(max(5, 1.1 * len(names)) * len(task_metrics) / 1.4, 3.4), squeeze=False)
    for axis, name in zip(axes[0], task_metrics):
        for x, v in enumerate(variants):
            m = _metric(v, name)
            colour = "C2" if v["name"] == report["best"] else ("C7" if x == 0 else "C0")
            axis.errorbar([x], [m["value"]], yerr=[[max(m["value"] - m["low"], 0)], [max(m["high"] - m["value"], 0)]], fmt="o", capsize=5, color=colour)
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axis.set_ylim(0, 1.02)
        axis.set_title(f"{name}, 95% interval (green: best)")
    plots = [_svg(figure)]
    labels = list(variants[0]["recall"])
    if labels:
        figure, axis = plt.subplots(figsize=(max(5, 1.1 * len(names)), 3.4))
        width = 0.8 / len(labels)
        for j, label in enumerate(labels):
            values = [v["recall"][label]["value"] for v in variants]
            axis.bar([x + (j - (len(labels) - 1) / 2) * width for x in range(len(names))], values, width, label=label)
            for x, v in enumerate(variants):
                if label in v["never_answers"]:
                    axis.text(x + (j - (len(labels) - 1) / 2) * width, 0.02, "never", rotation=90, ha="center", va="bottom", fontsize=7, color="#cf222e")
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axis.set_ylim(0, 1.05)
        axis.set_title("recall per label")
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        plots.append(_svg(figure))
    figure, axis = plt.subplots(figsize=(5, 3.4))
    primary = report["primary_metric"]
    for x, v in enumerate(variants):
        axis.scatter([v["prompt_tokens"]], [_metric(v, primary)["value"]], color="C2" if v["name"] == report["best"] else "C0")
        axis.annotate(v["name"], (v["prompt_tokens"], _metric(v, primary)["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set_xlabel("prompt tokens per request")
    axis.set_ylabel(primary)
    axis.set_title(f"{primary} against prompt length")
    plots.append(_svg(figure))
    return plots


def report_html(report: dict) -> str:
    """A self-contained HTML page: the plots as inline SVG, then the table."""
    markdown = report_markdown(report).splitlines()
    table = [line for line in markdown if line.startswith("|")]
    header, _, *body = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table]
    best = report["best"]
    rows_html = "".join(
        f"<tr{' class=best' if cells[0] == best + ' ★' else ''}>"
        + "".join(f"<td class=warn>{html.escape(c)}</td>" if "never" in c else f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for cells in body)
    notes = "".join("<p>" + _BOLD.sub(r"<b>\1</b>", html.escape(line)) + "</p>" for line in markdown[2:] if line and not line.startswith("|"))
    style = ("body{font-family:sans-serif;max-width:1300px;margin:2em auto}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}tr.best{background:#dafbe1}td.warn{background:#ffebe9;color:#cf222e}svg{max-width:100%;height:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Teacher variants: {html.escape(report['task'])}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(markdown[0].lstrip('# '))}</h1>{notes}"
            "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + f"</tr>{rows_html}</table>"
            + "".join(f"<div>{plot}</div>" for plot in _plots(report)) + "</body></html>\n")


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """``compare.json``, ``compare.md`` and ``compare.html`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "compare.json", out_dir / "compare.md", out_dir / "compare.html"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(report_markdown(report))
    paths[2].write_text(report_html(report))
    return paths


def apply(config: RunConfig, candidate: Candidate) -> RunConfig:
    """The run config with ``candidate`` as its teacher variant and endpoint, saved as the run's ``config.json``
    (what `stillhouse label --name RUN` and the adapter's registry lineage read)."""
    applied = config.model_copy(update={"teacher_variant": candidate.variant, "teacher": candidate.endpoint})
    applied = RunConfig.model_validate(applied.model_dump())
    config.run_dir.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "config.json").write_text(applied.model_dump_json(indent=2) + "\n")
    return applied
