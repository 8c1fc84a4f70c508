"""The distillation recipe, one function per stage; each reads and writes the run directory.

``runs/<name>/``
    ``config.json``            the resolved run config
    ``data/rows.jsonl``        rows as built from the source (labelled, sampled and judged in place)
    ``data/*_cache.jsonl``     teacher answers, self-consistency samples and judge scores (resumable)
    ``data/{train,test}.jsonl``, ``data/card.{json,md}``   curated splits and their dataset card
    ``train/``                 checkpoints, ``loss.{json,csv}``, ``adapter/``
    ``eval/``                  one JSON per evaluated endpoint, ``report.md``
    ``run.json``               the registered adapter id and its lineage

Setup → run → report: build → (label) → (sample teacher, judge) → curate → train → register → evaluate.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from serving import base_models
from serving.registry import AdapterEntry, Registry, default_registry_dir
from training import consistency, corrections, curation, dataset, distributed, lora, shots, trainer
from training.config import ConfigError, EndpointConfig, RunConfig
from training.endpoint import Completion, Endpoint
from training.evaluation import EvalReport, evaluate, report, report_markdown
from training.labelling import LabellingReport, label, teacher_name
from training.labelling import ask as ask_teacher
from training.row import Row
from training.task import Task, load_task

Say = Callable[[str], None]


def build(config: RunConfig, task: Task, say: Say) -> list[Row]:
    """Read the source into ``data/rows.jsonl``."""
    rows = dataset.load_rows(task, config.data)
    data_dir = _data_dir(config)
    dataset.write_rows(data_dir / "rows.jsonl", rows)
    _write_config(config)
    unlabelled = sum(1 for row in rows if row.output is None)
    say(f"built {len(rows)} rows from {config.data.source} ({unlabelled} without an output) into {data_dir / 'rows.jsonl'}")
    return rows


def label_rows(config: RunConfig, task: Task, teacher: EndpointConfig, say: Say, relabel: bool = False) -> LabellingReport:
    """Ask the teacher (as ``teacher_variant``) for every row without an output (all rows with ``relabel``); rewrite ``rows.jsonl``.

    With logit distillation (``train.kd_ratio`` > 0) the teacher's top ``train.kd_top_k`` tokens
    per generated position are asked for as well.
    """
    path = _data_dir(config) / "rows.jsonl"
    rows = dataset.read_rows(path)
    top_k = config.train.kd_top_k if config.train.kd_ratio > 0 else 0
    cache = _data_dir(config) / "teacher_cache.jsonl"
    variant = config.teacher_variant
    if variant.problems(task):
        raise ConfigError("; ".join(variant.problems(task)))
    labelled, report = label(rows, task, Endpoint(teacher), cache, relabel=relabel, top_k=top_k, variant=variant,
                             pool=shots.pool_for(variant, task, rows, config.data))
    dataset.write_rows(path, labelled)
    say(f"labelled {report.rows} rows as teacher variant {variant.name}: {report.cached} from the cache, {report.requested} asked, "
        f"{report.failed} failed, {report.mean_prompt_tokens:.1f} prompt tokens per request")
    return report


def prepare_curation(config: RunConfig, task: Task, say: Say) -> None:
    """The network stages the configured curation steps read: teacher samples, then judge scores."""
    if config.curation.self_consistency is not None:
        if config.teacher is None:
            raise ConfigError("curation.self_consistency samples the teacher: set teacher.url (or pass --teacher-url), or remove curation.self_consistency")
        sample_teacher(config, task, config.teacher, say)
    if config.curation.ranking is not None and config.curation.ranking.by == "judge":
        judge_rows(config, task, say)


def sample_teacher(config: RunConfig, task: Task, teacher: EndpointConfig, say: Say) -> consistency.StageReport:
    """Record ``curation.self_consistency.samples`` teacher answers on every row that reaches that step."""
    settings = config.curation.self_consistency
    path = _data_dir(config) / "rows.jsonl"
    rows = dataset.read_rows(path)
    candidates = curation.training_rows_before("self_consistency", rows, task, config.curation, config.data)
    sampled, report = consistency.sample_teacher(
        rows, task, Endpoint(teacher), settings, _data_dir(config) / "samples_cache.jsonl", {row.id for row in candidates},
        config.teacher_variant, shots.pool_for(config.teacher_variant, task, rows, config.data),
    )
    dataset.write_rows(path, sampled)
    say(f"sampled the teacher {settings.samples}x at temperature {settings.temperature} on {report.rows} training rows: "
        f"{report.cached} answers from the cache, {report.requested} asked, {report.failed} rows failed")
    return report


def judge_rows(config: RunConfig, task: Task, say: Say) -> consistency.StageReport:
    """Record the judge's score of every row's output as it reaches the ranking step."""
    ranking = config.curation.ranking
    path = _data_dir(config) / "rows.jsonl"
    rows = dataset.read_rows(path)
    candidates = curation.training_rows_before("ranking", rows, task, config.curation, config.data)
    judged, report = consistency.judge(
        rows, task, Endpoint(ranking.judge), ranking.judge_prompt, _data_dir(config) / "judge_cache.jsonl",
        {row.id: row.output for row in candidates},
    )
    dataset.write_rows(path, judged)
    say(f"judged {report.rows} training rows: {report.cached} from the cache, {report.requested} asked, {report.failed} without a score")
    return report


def curate(config: RunConfig, task: Task, say: Say) -> dict:
    """Run the curation steps on ``rows.jsonl`` into ``train.jsonl`` / ``test.jsonl`` and the card.

    Self-consistency and judge ranking read what :func:`prepare_curation` recorded in the rows.
    """
    data_dir = _data_dir(config)
    rows = dataset.read_rows(data_dir / "rows.jsonl")
    curated, reports = curation.curate(rows, task, config.curation, config.data)
    for split in dataset.SPLITS:
        dataset.write_rows(data_dir / f"{split}.jsonl", [row for row in curated if row.split == split])
    card = curation.dataset_card(task, config.data.source, curated, reports, _teacher_name(config, rows))
    if corrections.rounds(data_dir):
        card["corrections"] = corrections.card_section(data_dir)
    curation.write_card(data_dir, card)
    for report in reports:
        dropped = ", ".join(f"{reason} {count}" for reason, count in report["dropped"].items()) or "none dropped"
        relabelled = f", {len(report['params']['relabelled'])} relabelled by vote" if "relabelled" in report["params"] else ""
        say(f"{report['step']}: {report['rows_in']} → {report['rows_out']} ({dropped}{relabelled})")
    return card


def train(config: RunConfig, say: Say, on_step: Callable[[int], None] | None = None) -> tuple[trainer.TrainResult, AdapterEntry | None]:
    """Train on the curated training split (building, labelling and curating what is absent first) and register the adapter.

    Launched data-parallel, only rank 0 builds the data and registers; the other ranks return no entry.
    """
    # --- setup: task, base, servability, data
    task = load_task(config.task)
    base_dir = base_models.provision(config.base)
    # Refuse a non-servable shape before building or labelling any data for it.
    lora.require_servable(config.lora, base_dir)
    data_dir = _data_dir(config)
    if distributed.is_main():
        if not (data_dir / "card.json").is_file():
            if not (data_dir / "rows.jsonl").is_file():  # rows built (and perhaps labelled) already are kept
                build(config, task, say)
            if config.teacher is not None:
                label_rows(config, task, config.teacher, say)
            prepare_curation(config, task, say)
            curate(config, task, say)
        _write_config(config)
    distributed.barrier()
    rows = dataset.read_rows(data_dir / "train.jsonl")
    card = json.loads((data_dir / "card.json").read_text())

    # --- run
    result = trainer.train(rows, task, base_dir, config.lora, config.train, config.run_dir / "train", say=say, on_step=on_step)

    # --- report: register with lineage
    if not distributed.is_main():
        return result, None
    lineage = {
        "task": task.name,
        "task_sha256": hashlib.sha256(task.model_dump_json().encode()).hexdigest(),
        "teacher": card["teacher"],
        "dataset_card": card,
        "config": config.model_dump(mode="json"),
        "run_dir": str(config.run_dir.resolve()),
    }
    metrics = {"train_loss": result.final_loss, "train_steps": result.steps, "train_tokens_per_s": result.tokens_per_s}
    registry = Registry(Path(config.registry) if config.registry else default_registry_dir())
    entry = registry.add(result.adapter_dir, config.name, base_dir=base_dir, profile=config.lora.profile, metadata={"lineage": lineage, "metrics": metrics})
    (config.run_dir / "run.json").write_text(json.dumps({"adapter_id": entry.id, "registry": str(registry.root), "metrics": metrics}, indent=2) + "\n")
    say(f"registered {entry.id} in {registry.root} (final loss {result.final_loss:.4f}, {result.tokens_per_s:.0f} tok/s)")
    return result, entry


def evaluate_run(
    config: RunConfig, task: Task, student: EndpointConfig, teacher: EndpointConfig | None, say: Say, limit: int | None = None,
    judge: EndpointConfig | None = None,
) -> list[EvalReport]:
    """Score the student (student prompt) and optionally the teacher (asked as the run's teacher variant, as
    labelling asks it) on the run's test split; with ``judge``, each also on the task's judge criterion."""
    if judge is not None and task.judge is None:
        raise ConfigError(f"task {task.name!r} has no judge criterion; add judge: {{prompt: ..., scale: [1, 5]}} to the task file, or leave out --judge-url")
    rows = dataset.read_rows(_data_dir(config) / "test.jsonl")[:limit]
    judge_endpoint = Endpoint(judge) if judge is not None else None
    reports = [evaluate(task, rows, Endpoint(student), "student", judge_endpoint)]
    if teacher is not None:
        reports.append(_evaluate_teacher(config, task, rows, Endpoint(teacher), judge_endpoint))
    eval_dir = config.run_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    for report in reports:
        (eval_dir / f"{report.prompt}.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    markdown = report_markdown(task, reports)
    (eval_dir / "report.md").write_text(markdown)
    say(markdown)
    _record_metrics(config, reports[0])
    return reports


def _evaluate_teacher(config: RunConfig, task: Task, rows: list[Row], teacher: Endpoint, judge: Endpoint | None) -> EvalReport:
    """The teacher scored as it labels: the task's teacher prompt, or the applied teacher variant (through the labelling cache)."""
    variant = config.teacher_variant
    if not variant.changes():
        return evaluate(task, rows, teacher, "teacher", judge)
    data_dir = _data_dir(config)
    pool = shots.pool_for(variant, task, dataset.read_rows(data_dir / "rows.jsonl"), config.data)
    answers, _, _ = ask_teacher(rows, task, teacher, data_dir / "teacher_cache.jsonl", variant, pool)
    completions = [None if answer.text is None else Completion(answer.text, answer.prompt_tokens, answer.latency_s or 0.0) for answer in answers]
    return report(task, rows, teacher_name(teacher, variant), "teacher", completions, judge)


def _record_metrics(config: RunConfig, report: EvalReport) -> None:
    """Add the student's scores to its registry entry, when this run registered one."""
    run_file = config.run_dir / "run.json"
    if not run_file.is_file():
        return
    run = json.loads(run_file.read_text())
    metrics = {f"eval_{metric.name}": {"value": metric.value, "ci95": [metric.low, metric.high], "n": metric.n} for metric in report.metrics}
    metrics["eval_prompt_tokens_per_request"] = report.mean_prompt_tokens
    Registry(Path(run["registry"])).update_metadata(run["adapter_id"], metrics=metrics)


def _teacher_name(config: RunConfig, rows: list[Row]) -> str:
    teachers = sorted({row.teacher for row in rows if row.teacher})
    if teachers:
        return ", ".join(teachers)
    return "gold labels" if config.data.use_gold_as_output and any(row.gold for row in rows) else "source outputs"


def _data_dir(config: RunConfig) -> Path:
    return config.run_dir / "data"


def _write_config(config: RunConfig) -> None:
    config.run_dir.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "config.json").write_text(config.model_dump_json(indent=2) + "\n")


def stderr(message: str) -> None:
    """Progress lines for the CLI."""
    print(f"stillhouse: {message}", file=sys.stderr, flush=True)
