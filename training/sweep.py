"""One-parameter-at-a-time sweeps (playbook practice 10) from a base run config.

``stillhouse sweep --vary rank=8,16 --vary lr=1e-4,5e-4`` makes the base configuration plus one
variant per listed value that differs from the base, each changing exactly one field. Every
configuration is validated and checked servable (:func:`training.lora.require_servable`, the guard
``train`` and ``ablate`` use) *before anything trains*: one refused value refuses the
whole sweep with every reason, so a sweep is servable by construction.

Variants of curation fields (``max_label_ratio``, ``dedup_threshold``, ...) re-curate the run's
``rows.jsonl`` in memory and train on the resulting training split; all variants are scored on
the base configuration's test split, through one scratch server (:mod:`training.scratch_server`),
so scores are comparable and computed as `stillhouse eval` computes them.

Writes ``runs/<name>/sweep/``: ``sweep.json``, ``sweep.md`` (sorted by the task's primary
metric, best first), and each variant's ``<variant>/train`` and ``<variant>/eval.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from training import curation, dataset, lora
from training.ablation import prepare_data, train_and_score
from training.config import ConfigError, RunConfig
from training.scratch_server import scratch_server
from training.task import describe_errors, load_task

Say = Callable[[str], None]

# short name -> (dotted config field, parser of one value)
PARAMETERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "rank": ("lora.rank", int),
    "alpha": ("lora.alpha", float),
    "dropout": ("lora.dropout", float),
    "targets": ("lora.targets", lambda text: text.split("+")),  # q_proj+v_proj
    "lr": ("train.lr", float),
    "epochs": ("train.epochs", float),
    "max_steps": ("train.max_steps", int),
    "batch_size": ("train.batch_size", int),
    "grad_accum": ("train.grad_accum", int),
    "warmup_ratio": ("train.warmup_ratio", float),
    "kd_ratio": ("train.kd_ratio", float),  # with the base's teacher top-k labels: 0 is text-only distillation
    "max_label_ratio": ("curation.max_label_ratio", float),
    "max_per_label": ("curation.max_per_label", int),
    "dedup_threshold": ("curation.dedup_threshold", float),
    "min_chars": ("curation.min_chars", int),
    "max_chars": ("curation.max_chars", int),
}


class SweepRefusedError(ValueError):
    """At least one sweep configuration is invalid or not servable; nothing was trained."""


@dataclass(frozen=True)
class Variant:
    """One configuration of a sweep: the base (``field`` None) or the base with one field changed."""

    label: str
    field: str | None
    value: Any
    config: RunConfig


def parse_vary(items: list[str]) -> dict[str, list[Any]]:
    """``["rank=8,16", "lr=1e-4,5e-4"]`` → ``{"rank": [8, 16], "lr": [1e-4, 5e-4]}``."""
    vary: dict[str, list[Any]] = {}
    for item in items:
        name, _, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if name not in PARAMETERS or not values.strip():
            raise ConfigError(f"--vary {item!r}: use NAME=V1,V2 with NAME one of {', '.join(PARAMETERS)}")
        _, parse = PARAMETERS[name]
        try:
            vary[name] = [parse(value.strip()) for value in values.split(",") if value.strip()]
        except ValueError as error:
            raise ConfigError(f"--vary {item!r}: {error}") from None
    return vary


def variants(base: RunConfig, vary: dict[str, list[Any]]) -> list[Variant]:
    """The base plus one variant per (parameter, value) that differs from the base; invalid values are refused together."""
    out = [Variant("base", None, None, base)]
    problems = []
    for name, values in vary.items():
        dotted, _ = PARAMETERS[name]
        current = _get(base, dotted)
        for value in values:
            if value == current:
                continue
            data = base.model_dump(mode="json")
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
            label = f"{name}={'+'.join(value) if isinstance(value, list) else value}"
            try:
                out.append(Variant(label, dotted, value, RunConfig.model_validate(data)))
            except ValidationError as error:
                problems.append(f"{label}: {describe_errors(error)}")
    if problems:
        raise SweepRefusedError("refusing the sweep (nothing trained):\n  " + "\n  ".join(problems))
    return out


def check_all_servable(configs: list[Variant], base_dir) -> None:
    """Raise :class:`SweepRefusedError` with every reason when any configuration is not servable."""
    problems = []
    for variant in configs:
        try:
            lora.require_servable(variant.config.lora, base_dir)
        except lora.NotServableConfigError as refused:
            problems += [f"{variant.label} ({refused.profile} profile): {violation}" for violation in refused.violations]
    if problems:
        raise SweepRefusedError("refusing the sweep, not servable (nothing trained):\n  " + "\n  ".join(problems))


def sweep(base: RunConfig, vary: dict[str, list[Any]], say: Say, eval_limit: int | None = None) -> dict:
    """Check every configuration, then train and score each; write the sorted table."""
    from serving import base_models

    task = load_task(base.task)
    base_dir = base_models.provision(base.base)
    configs = variants(base, vary)
    check_all_servable(configs, base_dir)
    say(f"sweep: {len(configs)} configurations, all servable under their profiles")

    train_rows, test_rows = prepare_data(base, task, say)
    test_rows = test_rows[:eval_limit]
    all_rows = dataset.read_rows(base.run_dir / "data" / "rows.jsonl")
    out_dir = base.run_dir / "sweep"
    out_dir.mkdir(parents=True, exist_ok=True)
    primary = task.primary_metric
    results = []
    with scratch_server(base_dir, base.lora.profile) as server:
        for variant in configs:
            config = variant.config
            rows = train_rows
            if variant.field and variant.field.startswith("curation."):
                curated, _ = curation.curate(all_rows, task, config.curation, config.data)
                rows = [row for row in curated if row.split == "train"]
            say(f"sweep {variant.label}: training on {len(rows)} rows")
            result, scored = train_and_score(server, task, rows, test_rows, base_dir, config, out_dir / _slug(variant.label), say)
            metric = scored.metric(primary)
            results.append({
                "variant": variant.label, "changed": variant.field, "value": variant.value, "train_rows": len(rows),
                "steps": result.steps, "final_loss": result.final_loss, primary: metric.value, "ci95": [metric.low, metric.high],
                "test_rows": metric.n, "metrics": {m.name: m.value for m in scored.metrics},
            })
            say(f"sweep {variant.label}: {primary} {metric.value:.3f} (loss {result.final_loss:.4f})")
    # best primary metric first; ties broken by lower final training loss
    results.sort(key=lambda r: (-r[primary], r["final_loss"]))
    report = {"task": task.name, "base": base.base, "metric": primary, "vary": vary, "results": results, "base_config": base.model_dump(mode="json")}
    (out_dir / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "sweep.md").write_text(sweep_markdown(report))
    say(f"wrote {out_dir / 'sweep.md'} and sweep.json")
    return report


def sweep_markdown(report: dict) -> str:
    metric = report["metric"]
    lines = [
        f"# Sweep: {report['task']} on {report['base']}", "",
        "One parameter at a time: each variant changes exactly one field of the base configuration "
        "(column *changed*); every configuration was checked servable before training. "
        f"Sorted by {metric}, best first.", "",
        f"| rank | variant | changed (one field) | train rows | steps | final loss | {metric} [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for position, r in enumerate(report["results"], 1):
        changed = f"`{r['changed']}` = {r['value']}" if r["changed"] else "— (base)"
        lines.append(f"| {position} | {r['variant']} | {changed} | {r['train_rows']} | {r['steps']} | {r['final_loss']:.4f} | "
                     f"{r[metric]:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (n={r['test_rows']}) |")
    return "\n".join(lines) + "\n"


def _get(config: RunConfig, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", label)
