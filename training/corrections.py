"""Human corrections (playbook practice 5): export the rows worth a human's look, import their labels as gold.

``stillhouse data corrections export`` writes a CSV (or JSONL) a person edits in a spreadsheet:
one line per row worth a look, with why (``reasons``), the inputs, what the teacher (and, on
evaluated test rows, the student) answered, the current gold, and an empty ``label`` column.
Rows are worth a look when:

- ``student_teacher``: the evaluated student and the teacher disagree (``eval/student.json`` vs
  ``eval/teacher.json``, as ``stillhouse review`` lists them);
- ``teacher_gold``: the teacher's output disagrees with the row's gold label;
- ``low_confidence``: the teacher's per-token log-probability is among the lowest ``low_fraction``;
- ``split_vote``: the teacher's self-consistency samples (``teacher_samples``) do not all agree.

``stillhouse data corrections import FILE`` reads the edited file back: every line with a
``label`` becomes that row's gold (and, outside the test split, its training output), so
corrections are gold overrides. A correction never moves a row across the train/test split: a
file whose ``split`` differs from the row's is refused, and the split of every row is checked
unchanged after re-curation. Each import is logged (``data/corrections.jsonl``: who, when, the
file, counts, the ids and any ``note``) and recorded in the dataset card. A bad file is refused whole, every problem named
by line and column.
"""

from __future__ import annotations

import csv
import getpass
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from training import dataset, review
from training.config import RunConfig
from training.dataset import DatasetError
from training.row import Row
from training.task import Task

Say = Callable[[str], None]
REASONS = ("student_teacher", "teacher_gold", "low_confidence", "split_vote")
LOG = "corrections.jsonl"
_FIXED_COLUMNS = ("id", "split", "reasons")
_TAIL_COLUMNS = ("teacher", "student", "gold", "teacher_votes", "teacher_logprob_per_token", "label", "note")


class CorrectionsError(ValueError):
    """A corrections file cannot be applied; the message names every bad line and column."""


@dataclass(frozen=True)
class Correction:
    """One human label for one row."""

    id: str
    label: str
    note: str = ""


# --- export ---------------------------------------------------------------------------------


def candidates(rows: list[Row], task: Task, student: list[dict] | None = None, teacher: list[dict] | None = None,
               low_fraction: float = 0.1) -> list[dict]:
    """The rows worth a human's look, each a flat record with its reasons and an empty ``label``."""
    reasons: dict[str, list[str]] = {}
    student_answers: dict[str, str] = {}
    if student is not None and teacher is not None:
        for item in review.disagreements(student, teacher):
            reasons.setdefault(item["id"], []).append("student_teacher")
            student_answers[item["id"]] = item["student"]
    for row in rows:
        if row.gold is not None and row.output is not None and _label(task, row.output) != _label(task, row.gold):
            reasons.setdefault(row.id, []).append("teacher_gold")
        samples = [_label(task, sample) for sample in row.teacher_samples or ()]
        if len(set(samples)) > 1:
            reasons.setdefault(row.id, []).append("split_vote")
    confidences = {row.id: _per_token(row) for row in rows if _per_token(row) is not None}
    if confidences and low_fraction > 0:
        ranked = sorted(confidences, key=lambda row_id: (confidences[row_id], row_id))
        for row_id in ranked[: max(1, int(low_fraction * len(ranked)))]:
            reasons.setdefault(row_id, []).append("low_confidence")
    records = []
    for row in rows:
        if row.id not in reasons:
            continue
        votes = Counter(_label(task, sample) for sample in row.teacher_samples or ())
        confidence = confidences.get(row.id)
        records.append({
            "id": row.id, "split": row.split or "", "reasons": ";".join(sorted(set(reasons[row.id]), key=REASONS.index)),
            **{field: row.inputs.get(field, "") for field in task.input_fields},
            "teacher": row.output or "", "student": student_answers.get(row.id, ""), "gold": row.gold or "",
            "teacher_votes": ", ".join(f"{label} {count}" for label, count in votes.most_common()),
            "teacher_logprob_per_token": "" if confidence is None else f"{confidence:.4f}", "label": "", "note": "",
        })
    return records


def export(run_dir: Path, task: Task, out: Path, low_fraction: float = 0.1, limit: int | None = None) -> list[dict]:
    """Write the rows worth a look from the run in ``run_dir`` to ``out`` (.csv or .jsonl); returns them."""
    rows = _run_rows(run_dir)
    student, teacher = (_predictions(run_dir / "eval" / f"{name}.json") for name in ("student", "teacher"))
    records = candidates(rows, task, student, teacher, low_fraction)[:limit]
    columns = [*_FIXED_COLUMNS, *task.input_fields, *_TAIL_COLUMNS]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    elif out.suffix == ".csv":
        with out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
    else:
        raise CorrectionsError(f"{out}: write the corrections to a .csv or .jsonl file")
    return records


# --- import ---------------------------------------------------------------------------------


def read_file(path: Path, task: Task, rows: list[Row]) -> list[Correction]:
    """The corrections in an edited export: lines with a ``label``; every bad line and column is named."""
    records = _records(path)
    by_id = {row.id: row for row in rows}
    labels = list(task.output.labels) if task.output.type == "labels" else None
    problems, found, seen = [], [], {}
    for line, record in records:
        where = f"{path.name} line {line}"
        row_id = str(record.get("id") or "").strip()
        label = str(record.get("label") or "").strip()
        if not row_id:
            problems.append(f"{where}, column id: empty; keep the id the export wrote")
            continue
        if not label:
            continue  # not reviewed
        row = by_id.get(row_id)
        if row is None:
            problems.append(f"{where}, column id: {row_id!r} is not a row of this run; keep the id the export wrote")
            continue
        parsed = task.parse(label)
        if parsed.code != "ok":
            fix = f"write one of {', '.join(labels)}" if labels else f"write an output valid for the task ({parsed.code})"
            problems.append(f"{where}, column label: {label!r} is not a valid output; {fix}, or leave it empty to skip the row")
            continue
        value = parsed.value if labels else label
        split = str(record.get("split") or "").strip()
        if split and row.split and split != row.split:
            problems.append(f"{where}, column split: {split!r} but the row is in {row.split!r}; "
                            "a correction never moves a row across the train/test split: restore the split")
            continue
        if row_id in seen and seen[row_id] != value:
            problems.append(f"{where}, column label: row {row_id!r} is labelled {seen[row_id]!r} on an earlier line; keep one label per row")
            continue
        seen[row_id] = value
        found.append(Correction(row_id, value, str(record.get("note") or "")))
    if problems:
        raise CorrectionsError(f"{path}: {len(problems)} problem(s), nothing applied:\n  " + "\n  ".join(problems))
    return list({c.id: c for c in found}.values())


def apply(rows: list[Row], corrections: list[Correction], splits: dict[str, str] | None = None) -> tuple[list[Row], dict]:
    """Rows with each correction as gold (and, outside the test split, as output); and what changed.

    ``splits`` gives the split of rows whose own ``split`` is not set yet (curation assigned it).
    """
    by_id = {c.id: c for c in corrections}
    out, changed, by_split, moves = [], 0, Counter(), Counter()
    for row in rows:
        correction = by_id.get(row.id)
        if correction is None:
            out.append(row)
            continue
        split = row.split or (splits or {}).get(row.id)
        fixed = replace(row, gold=correction.label)
        if split != "test":
            keep = row.output == correction.label
            fixed = replace(fixed, output=correction.label, teacher_logprob=row.teacher_logprob if keep else None)
        changed += row.gold != correction.label
        by_split[split or "unsplit"] += 1
        if row.gold != correction.label:
            moves[f"{row.gold or '(none)'} → {correction.label}"] += 1
        out.append(fixed)
    return out, {"applied": len(corrections), "changed_gold": changed, "by_split": dict(sorted(by_split.items())),
                 "changes": dict(moves.most_common())}


def import_file(config: RunConfig, task: Task, path: Path, say: Say, by: str | None = None) -> dict:
    """Apply the corrections in ``path`` to the run's rows, log the round, and re-curate a curated run
    (checking that no row changed split); returns the round's record."""
    from training import recipe

    data_dir = config.run_dir / "data"
    known = _run_rows(config.run_dir)
    corrections = read_file(path, task, known)
    before = _curated_splits(data_dir)
    rows = dataset.read_rows(data_dir / "rows.jsonl")
    fixed, summary = apply(rows, corrections, {row.id: row.split for row in known if row.split})
    dataset.write_rows(data_dir / "rows.jsonl", fixed)
    record = {"file": str(path), "by": by or getpass.getuser(), "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              **summary, "ids": [c.id for c in corrections], "notes": {c.id: c.note for c in corrections if c.note}}
    with (data_dir / LOG).open("a") as log:
        log.write(json.dumps(record) + "\n")
    say(f"corrections: {summary['applied']} rows from {path.name} ({summary['changed_gold']} changed gold; "
        f"{', '.join(f'{k} {v}' for k, v in summary['by_split'].items()) or 'none'}) by {record['by']}")
    if (data_dir / "card.json").is_file():
        recipe.curate(config, task, say)
        check_splits(before, _curated_splits(data_dir))
    return record


def rounds(data_dir: Path) -> list[dict]:
    """Every logged import, oldest first."""
    log = Path(data_dir) / LOG
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def corrected_ids(data_dir: Path) -> set[str]:
    """The ids of every row a human corrected."""
    return {row_id for entry in rounds(data_dir) for row_id in entry["ids"]}


def card_section(data_dir: Path) -> list[dict]:
    """What the dataset card records of the corrections: one entry per import (who, when, counts)."""
    return [{key: value for key, value in entry.items() if key not in ("ids", "notes")} for entry in rounds(data_dir)]


def check_splits(before: dict[str, str], after: dict[str, str]) -> None:
    """Refuse a curation after which a corrected row sits in another split than before."""
    moved = sorted(row_id for row_id, split in after.items() if row_id in before and before[row_id] != split)
    if moved:
        raise DatasetError(f"corrections moved rows {moved[:5]} across the train/test split; this is a bug: report it")


def _run_rows(run_dir: Path) -> list[Row]:
    rows_file = Path(run_dir) / "data" / "rows.jsonl"
    if not rows_file.is_file():
        raise CorrectionsError(f"{rows_file}: no rows; run `stillhouse data build` (and `stillhouse label`) first")
    rows = dataset.read_rows(rows_file)
    splits = _curated_splits(Path(run_dir) / "data")
    return [replace(row, split=row.split or splits.get(row.id)) for row in rows]


def _curated_splits(data_dir: Path) -> dict[str, str]:
    splits = {}
    for name in dataset.SPLITS:
        split_file = Path(data_dir) / f"{name}.jsonl"
        if split_file.is_file():
            splits.update({row.id: name for row in dataset.read_rows(split_file)})
    return splits


def _predictions(path: Path) -> list[dict] | None:
    return json.loads(path.read_text())["predictions"] if path.is_file() else None


def _records(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise CorrectionsError(f"{path}: no such file; pass the file `stillhouse data corrections export` wrote, edited")
    if path.suffix == ".jsonl":
        records = []
        for line, text in enumerate(path.read_text().splitlines(), 1):
            if text.strip():
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    raise CorrectionsError(f"{path.name} line {line}: not a JSON object ({error.msg}); fix or remove the line") from None
                if not isinstance(record, dict):
                    raise CorrectionsError(f"{path.name} line {line}: not a JSON object; write one object per line")
                records.append((line, record))
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:  # spreadsheets save a byte-order mark
            reader = csv.DictReader(handle)
            records = [(line, record) for line, record in enumerate(reader, 2)]
            columns = reader.fieldnames or []
        missing = [column for column in ("id", "label") if column not in columns]
        if missing:
            raise CorrectionsError(f"{path.name} line 1: no {' or '.join(missing)} column; keep the header the export wrote")
    else:
        raise CorrectionsError(f"{path}: read a .csv or .jsonl file")
    return records


def _label(task: Task, text: str) -> str:
    parsed = task.parse(text or "")
    return parsed.value if parsed.code == "ok" and isinstance(parsed.value, str) else (text or "").strip()


def _per_token(row: Row) -> float | None:
    if row.teacher_logprob is None:
        return None
    return row.teacher_logprob / len(row.teacher_tokens) if row.teacher_tokens else row.teacher_logprob
