"""Curation: rule filters, near-duplicate removal and label balancing, each step accounted for.

Every step takes rows and returns a :class:`Step` with the rows kept and, for each row dropped,
a stable reason code. :func:`curate` runs them in the order that keeps test rows out of
training: filters → near-dedup over *all* rows (test rows win ties) → split → balance the
training split. The steps become the dataset card (JSON and Markdown) of the run.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from datasketch import MinHash, MinHashLSH

from training.config import CurationConfig, DataConfig
from training.dataset import assign_splits
from training.task import Task


@dataclass
class Step:
    """One curation step: its parameters, the rows it kept, and why it dropped the others."""

    name: str
    params: dict
    kept: list[dict]
    dropped: list[tuple[dict, str]] = field(default_factory=list)

    def report(self, rows_in: int) -> dict:
        reasons = Counter(reason for _, reason in self.dropped)
        examples = {reason: [row["id"] for row, r in self.dropped if r == reason][:5] for reason in reasons}
        return {
            "step": self.name,
            "params": self.params,
            "rows_in": rows_in,
            "rows_out": len(self.kept),
            "dropped": dict(sorted(reasons.items())),
            "examples": examples,
        }


def rule_filter(rows: list[dict], task: Task, config: CurationConfig) -> Step:
    """Drop rows with empty, too short or too long inputs, inputs not matching ``input_regex``,
    and outputs that are missing or do not parse under the task's format (label set, regex, JSON schema)."""
    pattern = re.compile(config.input_regex) if config.input_regex else None
    step = Step("rule_filter", {"min_chars": config.min_chars, "max_chars": config.max_chars, "input_regex": config.input_regex}, [])
    for row in rows:
        reason = _rule_violation(row, task, config, pattern)
        if reason:
            step.dropped.append((row, reason))
        else:
            step.kept.append({**row, "output": _canonical_output(task, row["output"])})
    return step


def near_dedup(rows: list[dict], task: Task, threshold: float, num_perm: int) -> Step:
    """Drop rows whose input is a near-duplicate (MinHash over word 3-grams) of an earlier kept row.

    Rows already assigned to ``test`` are considered first, so a duplicate pair that straddles
    the split always loses its training copy.
    """
    ordered = sorted(rows, key=lambda row: row.get("split") != "test")
    index = MinHashLSH(threshold=threshold, num_perm=num_perm)
    step = Step("near_dedup", {"threshold": threshold, "num_perm": num_perm, "shingles": "word 3-grams"}, [])
    for position, row in enumerate(ordered):
        signature = _minhash(task.input_text(row["inputs"]), num_perm)
        matches = index.query(signature)
        if matches:
            step.dropped.append((row, "near_duplicate"))
            continue
        index.insert(str(position), signature)
        step.kept.append(row)
    return step


def split(rows: list[dict], task: Task, data: DataConfig) -> Step:
    """Assign ``train`` / ``test`` to rows without a split (after dedup, so no pair straddles it)."""
    assigned = assign_splits(rows, task, data.test_fraction, data.seed)
    counts = Counter(row["split"] for row in assigned)
    return Step("split", {"test_fraction": data.test_fraction, "seed": data.seed, **{f"{k}_rows": v for k, v in sorted(counts.items())}}, assigned)


def balance(rows: list[dict], task: Task, config: CurationConfig, seed: int) -> Step:
    """Cap each training label at ``max_label_ratio`` × the rarest label's count (and ``max_per_label``).

    Only label-set tasks are balanced; test rows pass untouched so the evaluation set stays fixed.
    """
    step = Step("balance", {"max_label_ratio": config.max_label_ratio, "max_per_label": config.max_per_label}, [])
    train = [row for row in rows if row["split"] == "train"]
    if task.output.type != "labels" or not train:
        step.kept = list(rows)
        return step
    counts = Counter(row["output"] for row in train)
    cap = int(min(counts.values()) * config.max_label_ratio)
    if config.max_per_label is not None:
        cap = min(cap, config.max_per_label)
    rng = random.Random(seed)
    over = {}
    for label, count in counts.items():
        members = [row["id"] for row in train if row["output"] == label]
        over[label] = set(rng.sample(members, count - cap)) if count > cap else set()
    step.params["cap"] = cap
    for row in rows:
        if row["split"] == "train" and row["id"] in over[row["output"]]:
            step.dropped.append((row, f"over_cap:{row['output']}"))
        else:
            step.kept.append(row)
    return step


def curate(rows: list[dict], task: Task, config: CurationConfig, data: DataConfig) -> tuple[list[dict], list[dict]]:
    """Run every enabled step; returns (curated rows with splits, one report per step)."""
    reports = []
    steps = [lambda r: rule_filter(r, task, config)]
    if config.dedup:
        steps.append(lambda r: near_dedup(r, task, config.dedup_threshold, config.dedup_num_perm))
    steps.append(lambda r: split(r, task, data))
    if config.balance:
        steps.append(lambda r: balance(r, task, config, data.seed))
    for run_step in steps:
        step = run_step(rows)
        reports.append(step.report(len(rows)))
        rows = step.kept
    return rows, reports


def dataset_card(task: Task, source: str, rows: list[dict], reports: list[dict], teacher: str) -> dict:
    """What a dataset is and how it was made: source, teacher, per-step accounting, final counts."""
    final = {}
    for name in ("train", "test"):
        members = [row for row in rows if row["split"] == name]
        final[name] = {"rows": len(members), "outputs": dict(sorted(Counter(_label_key(task, row["output"]) for row in members).items()))}
    digest = hashlib.sha256("".join(json.dumps(row, sort_keys=True) for row in rows).encode()).hexdigest()
    return {"task": task.name, "source": source, "teacher": teacher, "steps": reports, "splits": final, "sha256": digest}


def card_markdown(card: dict) -> str:
    """The dataset card as a Markdown page."""
    lines = [
        f"# Dataset card: {card['task']}",
        "",
        f"- source: `{card['source']}`",
        f"- teacher: `{card['teacher']}`",
        f"- sha256 of the curated rows: `{card['sha256']}`",
        "",
        "| step | rows in | rows out | dropped (reason: rows) | params |",
        "|---|---|---|---|---|",
    ]
    for report in card["steps"]:
        dropped = ", ".join(f"{reason}: {count}" for reason, count in report["dropped"].items()) or "—"
        params = ", ".join(f"{key}={value}" for key, value in report["params"].items())
        lines.append(f"| {report['step']} | {report['rows_in']} | {report['rows_out']} | {dropped} | {params} |")
    lines += ["", "| split | rows | outputs |", "|---|---|---|"]
    for name, split_card in card["splits"].items():
        outputs = ", ".join(f"{key}: {value}" for key, value in split_card["outputs"].items())
        lines.append(f"| {name} | {split_card['rows']} | {outputs} |")
    return "\n".join(lines) + "\n"


def write_card(directory: Path, card: dict) -> None:
    """``card.json`` and ``card.md`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (directory / "card.md").write_text(card_markdown(card))


def _rule_violation(row: dict, task: Task, config: CurationConfig, pattern: re.Pattern | None) -> str | None:
    inputs = row.get("inputs") or {}
    if any(not str(inputs.get(name) or "").strip() for name in task.input_fields):
        return "missing_input"
    text = task.input_text(inputs)
    if len(text) < config.min_chars:
        return "too_short"
    if len(text) > config.max_chars:
        return "too_long"
    if pattern is not None and not pattern.search(text):
        return "input_regex_mismatch"
    if row.get("output") is None:
        return "missing_output"
    parsed = task.parse(row["output"])
    return None if parsed.code == "ok" else f"output_{parsed.code}"


def _canonical_output(task: Task, output: str) -> str:
    """Labels in their declared spelling; other formats as given, stripped."""
    parsed = task.parse(output)
    return parsed.value if task.output.type == "labels" else output.strip()


def _label_key(task: Task, output: str | None) -> str:
    return str(output) if task.output.type == "labels" else "(free text)"


def _minhash(text: str, num_perm: int) -> MinHash:
    words = re.findall(r"\w+", text.lower())
    shingles = {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))} or {""}
    signature = MinHash(num_perm=num_perm, seed=1)
    for shingle in shingles:
        signature.update(shingle.encode())
    return signature
