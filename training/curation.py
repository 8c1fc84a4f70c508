"""Curation: rule filters, near-duplicate removal, teacher self-consistency, ranking and label
balancing, each step accounted for.

Every step takes rows and returns a :class:`Step` with the rows kept and, for each row dropped,
a stable reason code. :func:`curate` runs them in this order:

1. rule filter: cheap checks first, so no later step (or request) spends anything on bad rows;
2. near-dedup over *all* rows (test rows win ties), before the split so no pair straddles it;
3. split: a pure function of each row's input text;
4. self-consistency (optional, training rows only): drops rows the teacher does not answer
   consistently, and may relabel by majority vote, so that what is ranked next is final;
5. ranking (optional, training rows only): keeps the best-scored fraction of what is left;
6. balance (training rows only): caps labels last, on the rows that will actually be trained on.

Test rows are never dropped after the split, so the evaluation set stays fixed. The steps that
need a teacher or a judge read what the network stages (:mod:`training.consistency`) wrote into
the rows (``teacher_samples``, ``judge_score``) and are pure. The steps become the dataset card
(JSON and Markdown) of the run.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from datasketch import MinHash, MinHashLSH

from training.config import CurationConfig, DataConfig, RankingConfig, SelfConsistencyConfig
from training.dataset import DatasetError, assign_splits
from training.row import Row
from training.task import Task


@dataclass
class Step:
    """One curation step: its parameters, the rows it kept, and why it dropped the others."""

    name: str
    params: dict
    kept: list[Row]
    dropped: list[tuple[Row, str]] = field(default_factory=list)

    def report(self, rows_in: int) -> dict:
        reasons = Counter(reason for _, reason in self.dropped)
        examples = {reason: [row.id for row, r in self.dropped if r == reason][:5] for reason in reasons}
        return {
            "step": self.name,
            "params": self.params,
            "rows_in": rows_in,
            "rows_out": len(self.kept),
            "dropped": dict(sorted(reasons.items())),
            "examples": examples,
        }


def rule_filter(rows: list[Row], task: Task, config: CurationConfig) -> Step:
    """Drop rows with empty, too short or too long inputs, inputs not matching ``input_regex``,
    and outputs that are missing or do not parse under the task's format (label set, regex, JSON schema)."""
    pattern = re.compile(config.input_regex) if config.input_regex else None
    step = Step("rule_filter", {"min_chars": config.min_chars, "max_chars": config.max_chars, "input_regex": config.input_regex}, [])
    for row in rows:
        reason = _rule_violation(row, task, config, pattern)
        if reason:
            step.dropped.append((row, reason))
        else:
            step.kept.append(replace(row, output=_canonical_output(task, row.output)))
    return step


def near_dedup(rows: list[Row], task: Task, threshold: float, num_perm: int) -> Step:
    """Drop rows whose input is a near-duplicate (MinHash over word 3-grams) of an earlier kept row.

    Rows already assigned to ``test`` are considered first, so a duplicate pair that straddles
    the split always loses its training copy.
    """
    ordered = sorted(rows, key=lambda row: row.split != "test")
    index = MinHashLSH(threshold=threshold, num_perm=num_perm)
    step = Step("near_dedup", {"threshold": threshold, "num_perm": num_perm, "shingles": "word 3-grams"}, [])
    for position, row in enumerate(ordered):
        signature = _minhash(task.input_text(row.inputs), num_perm)
        matches = index.query(signature)
        if matches:
            step.dropped.append((row, "near_duplicate"))
            continue
        index.insert(str(position), signature)
        step.kept.append(row)
    return step


def split(rows: list[Row], task: Task, data: DataConfig) -> Step:
    """Assign ``train`` / ``test`` to rows without a split (after dedup, so no pair straddles it)."""
    assigned = assign_splits(rows, task, data.test_fraction, data.seed)
    counts = Counter(row.split for row in assigned)
    return Step("split", {"test_fraction": data.test_fraction, "seed": data.seed, **{f"{k}_rows": v for k, v in sorted(counts.items())}}, assigned)


def self_consistency(rows: list[Row], task: Task, config: SelfConsistencyConfig) -> Step:
    """Keep training rows whose teacher samples (``teacher_samples``) agree with the row's output.

    Each of the first ``config.samples`` samples that parses under the task's format votes: labels
    by their canonical spelling, other formats by their stripped text; samples that do not parse
    vote for nothing. The winner is the row's own output when it ties for the most votes, else
    the most-voted answer (first sampled among equals). A row whose winner has fewer than
    ``min_agreement`` × samples votes is dropped as ``inconsistent_teacher``; a row whose output
    is not the winner is relabelled with ``relabel`` (listed in the step params), else dropped as
    ``disagrees_with_vote``. A relabelled row's ``teacher_logprob`` scored the old output and is
    removed (``teacher_tokens`` stay: training uses only their prefix shared with the output).
    Training rows without enough samples are dropped as ``no_teacher_samples``.
    """
    train = [row for row in rows if row.split == "train"]
    if train and not any(len(row.teacher_samples or ()) >= config.samples for row in train):
        raise DatasetError(
            f"curation.self_consistency needs {config.samples} teacher_samples per training row and no row has them; "
            "sample the teacher first (set teacher.url and run `stillhouse data curate`, which samples before curating) "
            "or remove curation.self_consistency"
        )
    params = {"samples": config.samples, "temperature": config.temperature, "min_agreement": config.min_agreement, "relabel": config.relabel}
    step = Step("self_consistency", params, [])
    relabelled = []
    for row in rows:
        if row.split != "train":
            step.kept.append(row)
            continue
        samples = (row.teacher_samples or ())[: config.samples]
        if len(samples) < config.samples:
            step.dropped.append((row, "no_teacher_samples"))
            continue
        votes: Counter = Counter()
        for sample in samples:
            parsed = task.parse(sample)
            if parsed.code == "ok":
                votes[_vote_key(task, sample, parsed.value)] += 1
        own = _vote_key(task, row.output, task.parse(row.output).value)
        top = max(votes.values(), default=0)
        winner = own if votes.get(own, 0) == top else next((key for key, count in votes.items() if count == top), None)
        if winner is None or top < config.min_agreement * config.samples - 1e-9:
            step.dropped.append((row, "inconsistent_teacher"))
        elif winner == own:
            step.kept.append(row)
        elif config.relabel:
            relabelled.append({"id": row.id, "from": row.output, "to": winner})
            step.kept.append(replace(row, output=winner, teacher_logprob=None))
        else:
            step.dropped.append((row, "disagrees_with_vote"))
    if config.relabel:
        step.params["relabelled"] = relabelled
    return step


def rank(rows: list[Row], config: RankingConfig) -> Step:
    """Keep the best-scored ``keep_fraction`` of the training rows (test rows pass untouched).

    The score is ``teacher_logprob`` (higher is better; divided by the answer's token count,
    ``teacher_tokens``, with ``per_token``) or ``judge_score`` when it was given for the row's
    current output. Training rows without a score are dropped as ``no_score``; of the n scored,
    the top ``floor(keep_fraction × n)`` (at least one) are kept, equal scores ordered by row id,
    and the rest dropped as ``below_threshold``. ``params.threshold`` is the lowest kept score.
    """
    train = [row for row in rows if row.split == "train"]
    scores = {row.id: _score(row, config) for row in train}
    field_name = {"judge": "judge_score", "teacher_logprob": "teacher_logprob"}[config.by] + (" and teacher_tokens" if config.per_token else "")
    if train and all(score is None for score in scores.values()):
        fix = (
            "run `stillhouse data curate` with curation.ranking.judge set (it asks the judge before curating)"
            if config.by == "judge"
            else "label with a teacher that reports log-probabilities (`stillhouse label --relabel`; teacher_tokens come from "
            "LoRAX teachers, or OpenAI ones with train.kd_ratio > 0), or set curation.ranking.by: judge"
        )
        raise DatasetError(f"curation.ranking.by is {config.by!r} but no training row has a {field_name}; {fix}")
    scored = sorted((row for row in train if scores[row.id] is not None), key=lambda row: (-scores[row.id], row.id))
    keep_count = max(1, math.floor(round(config.keep_fraction * len(scored), 9))) if scored else 0
    keep = {row.id for row in scored[:keep_count]}
    params = {"by": config.by, "keep_fraction": config.keep_fraction, "scored_rows": len(scored)}
    if config.by == "teacher_logprob":
        params["per_token"] = config.per_token
    params["threshold"] = scores[scored[keep_count - 1].id] if scored else None
    step = Step("ranking", params, [])
    for row in rows:
        if row.split != "train" or row.id in keep:
            step.kept.append(row)
        else:
            step.dropped.append((row, "no_score" if scores[row.id] is None else "below_threshold"))
    return step


def balance(rows: list[Row], task: Task, config: CurationConfig, seed: int) -> Step:
    """Cap each training label at ``max_label_ratio`` × the rarest label's count (and ``max_per_label``).

    Only label-set tasks are balanced; test rows pass untouched so the evaluation set stays fixed.
    """
    step = Step("balance", {"max_label_ratio": config.max_label_ratio, "max_per_label": config.max_per_label}, [])
    train = [row for row in rows if row.split == "train"]
    if task.output.type != "labels" or not train:
        step.kept = list(rows)
        return step
    counts = Counter(row.output for row in train)
    cap = int(min(counts.values()) * config.max_label_ratio)
    if config.max_per_label is not None:
        cap = min(cap, config.max_per_label)
    rng = random.Random(seed)
    over = {}
    for label, count in counts.items():
        members = [row.id for row in train if row.output == label]
        over[label] = set(rng.sample(members, count - cap)) if count > cap else set()
    step.params["cap"] = cap
    for row in rows:
        if row.split == "train" and row.id in over[row.output]:
            step.dropped.append((row, f"over_cap:{row.output}"))
        else:
            step.kept.append(row)
    return step


def curate(rows: list[Row], task: Task, config: CurationConfig, data: DataConfig) -> tuple[list[Row], list[dict]]:
    """Run every enabled step; returns (curated rows with splits, one report per step)."""
    reports = []
    for _, run_step in enabled_steps(task, config, data):
        step = run_step(rows)
        reports.append(step.report(len(rows)))
        rows = step.kept
    return rows, reports


def training_rows_before(step_name: str, rows: list[Row], task: Task, config: CurationConfig, data: DataConfig) -> list[Row]:
    """The training rows as they reach step ``step_name`` of :func:`curate`: the rows a network
    stage feeding that step (teacher samples, judge scores) needs to ask about, and no others."""
    for name, run_step in enabled_steps(task, config, data):
        if name == step_name:
            break
        rows = run_step(rows).kept
    return [row for row in rows if row.split == "train"]


def enabled_steps(task: Task, config: CurationConfig, data: DataConfig) -> list[tuple[str, Callable[[list[Row]], Step]]]:
    """The enabled steps of :func:`curate`, in order, by name."""
    steps: list[tuple[str, Callable[[list[Row]], Step]]] = [("rule_filter", lambda r: rule_filter(r, task, config))]
    if config.dedup:
        steps.append(("near_dedup", lambda r: near_dedup(r, task, config.dedup_threshold, config.dedup_num_perm)))
    steps.append(("split", lambda r: split(r, task, data)))
    if config.self_consistency is not None:
        steps.append(("self_consistency", lambda r: self_consistency(r, task, config.self_consistency)))
    if config.ranking is not None:
        steps.append(("ranking", lambda r: rank(r, config.ranking)))
    if config.balance:
        steps.append(("balance", lambda r: balance(r, task, config, data.seed)))
    return steps


def dataset_card(task: Task, source: str, rows: list[Row], reports: list[dict], teacher: str) -> dict:
    """What a dataset is and how it was made: source, teacher, per-step accounting, final counts."""
    final = {}
    for name in ("train", "test"):
        members = [row for row in rows if row.split == name]
        final[name] = {"rows": len(members), "outputs": dict(sorted(Counter(_label_key(task, row.output) for row in members).items()))}
    return {"task": task.name, "source": source, "teacher": teacher, "steps": reports, "splits": final, "sha256": rows_digest(rows)}


def rows_digest(rows: list[Row]) -> str:
    """The sha256 of curated rows as the dataset card records it (key order does not matter)."""
    return hashlib.sha256("".join(json.dumps(row.to_json(), sort_keys=True) for row in rows).encode()).hexdigest()


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
        params = ", ".join(f"{key}={len(value) if isinstance(value, list) else value}" for key, value in report["params"].items())
        lines.append(f"| {report['step']} | {report['rows_in']} | {report['rows_out']} | {dropped} | {params} |")
    lines += ["", "| split | rows | outputs |", "|---|---|---|"]
    for name, split_card in card["splits"].items():
        outputs = ", ".join(f"{key}: {value}" for key, value in split_card["outputs"].items())
        lines.append(f"| {name} | {split_card['rows']} | {outputs} |")
    if card.get("corrections"):
        lines += ["", "Human corrections (gold overrides; no row changes split):", "", "| when | by | file | rows | gold changed | by split | changes |", "|---|---|---|---|---|---|---|"]
        for entry in card["corrections"]:
            splits = ", ".join(f"{key}: {value}" for key, value in entry["by_split"].items())
            changes = ", ".join(f"{key}: {value}" for key, value in entry["changes"].items()) or "—"
            lines.append(f"| {entry['at']} | {entry['by']} | `{entry['file']}` | {entry['applied']} | {entry['changed_gold']} | {splits} | {changes} |")
    return "\n".join(lines) + "\n"


def write_card(directory: Path, card: dict) -> None:
    """``card.json`` and ``card.md`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (directory / "card.md").write_text(card_markdown(card))


def _rule_violation(row: Row, task: Task, config: CurationConfig, pattern: re.Pattern | None) -> str | None:
    inputs = row.inputs
    if any(not str(inputs.get(name) or "").strip() for name in task.input_fields):
        return "missing_input"
    text = task.input_text(inputs)
    if len(text) < config.min_chars:
        return "too_short"
    if len(text) > config.max_chars:
        return "too_long"
    if pattern is not None and not pattern.search(text):
        return "input_regex_mismatch"
    if row.output is None:
        return "missing_output"
    parsed = task.parse(row.output)
    return None if parsed.code == "ok" else f"output_{parsed.code}"


def _canonical_output(task: Task, output: str) -> str:
    """Labels in their declared spelling; other formats as given, stripped."""
    parsed = task.parse(output)
    return parsed.value if task.output.type == "labels" else output.strip()


def _label_key(task: Task, output: str | None) -> str:
    return str(output) if task.output.type == "labels" else "(free text)"


def _vote_key(task: Task, text: str, value) -> str:
    """What a self-consistency vote compares: the canonical label, else the stripped text."""
    return value if task.output.type == "labels" and value is not None else (text or "").strip()


def _score(row: Row, config: RankingConfig) -> float | None:
    if config.by == "judge":
        scored_output = row.judge_output
        return row.judge_score if scored_output is not None and scored_output == row.output else None
    logprob = row.teacher_logprob
    if logprob is None or not config.per_token:
        return logprob
    tokens = row.teacher_tokens or ()
    return logprob / len(tokens) if tokens else None


def _minhash(text: str, num_perm: int) -> MinHash:
    words = re.findall(r"\w+", text.lower())
    shingles = {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))} or {""}
    signature = MinHash(num_perm=num_perm, seed=1)
    for shingle in shingles:
        signature.update(shingle.encode())
    return signature
