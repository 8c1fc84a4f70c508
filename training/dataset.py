"""Datasets: :class:`~training.row.Row` s of task inputs with the teacher's output and, when known, a gold label.

Rows come from the task's generator, JSONL or CSV files, a local HF ``datasets`` directory
(``save_to_disk``), or the request log; a source fixes a row's ``split`` when it has one (the
demo generator's held-out vocabulary, a DatasetDict's splits). Other splits are a pure function
of each row's input text, so adding rows never moves old ones. A run's row files are read and
written with :func:`read_rows` / :func:`write_rows`.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from training.config import DataConfig
from training.row import Row, RowError
from training.task import Task

SPLITS = ("train", "test")


class DatasetError(ValueError):
    """A data source cannot be read as rows of the task; the message says what to fix."""


def load_rows(task: Task, data: DataConfig) -> list[Row]:
    """Every row of ``data.source`` for ``task``, in a stable order."""
    source = data.source
    if source == "generator":
        return _generated_rows(task, data)
    if source.startswith("request-log:"):
        return _logged_rows(task, data, source.removeprefix("request-log:"))
    path = Path(source).expanduser()
    if path.is_dir():
        return _saved_dataset_rows(task, data, path)
    if not path.is_file():
        raise DatasetError(f"data.source {source!r}: no such file; pass a .jsonl or .csv file, a saved HF datasets directory, or 'generator'")
    if path.suffix == ".jsonl":
        records = _read_records(path)
    elif path.suffix == ".csv":
        with path.open(newline="") as handle:
            records = list(csv.DictReader(handle))
    else:
        raise DatasetError(f"data.source {source!r}: unsupported file type; use .jsonl or .csv")
    return [_row_from_record(task, data, record, f"{path.name}:{index}") for index, record in enumerate(records)]


def assign_splits(rows: list[Row], task: Task, test_fraction: float, seed: int) -> list[Row]:
    """Give every row without a split one, by a hash of its input text (stable under additions)."""
    assigned = []
    for row in rows:
        if row.split is None:
            digest = hashlib.sha256(f"{seed}\x00{task.input_text(row.inputs)}".encode()).digest()
            fraction = int.from_bytes(digest[:8], "big") / 2**64
            row = replace(row, split="test" if fraction < test_fraction else "train")
        assigned.append(row)
    return assigned


def write_rows(path: Path, rows: Iterable[Row]) -> None:
    """Write a row file atomically (a crash leaves the old file, never half a new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as out:
        for row in rows:
            out.write(json.dumps(row.to_json(), ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def read_rows(path: Path) -> list[Row]:
    """The rows of a file written by :func:`write_rows`; a line that is not a row is an error naming it."""
    path = Path(path)
    rows = []
    for number, record in _numbered_records(path):
        try:
            rows.append(Row.from_json(record))
        except RowError as error:
            raise DatasetError(f"{path}:{number}: {error}") from None
    return rows


def _read_records(path: Path) -> list[dict]:
    """The JSON objects of a source JSONL file, one per non-empty line."""
    return [record for _, record in _numbered_records(path)]


def _numbered_records(path: Path) -> list[tuple[int, dict]]:
    records = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise DatasetError(f"{path}:{number}: not a JSON object ({error.msg}); fix or remove the line") from None
    return records


def _row_from_record(task: Task, data: DataConfig, record: dict, fallback_id: str) -> Row:
    """A flat record (one column per input field) as a row; missing inputs stay empty for curation to drop."""
    inputs = {field: "" if record.get(field) is None else str(record.get(field)) for field in task.input_fields}
    gold = record.get(data.gold_field) or None
    output = record.get(data.output_field) or None
    if output is None and gold is not None and data.use_gold_as_output:
        output = gold
    split = record.get("split") if record.get("split") in SPLITS else None
    return Row(id=str(record.get("id") or fallback_id), inputs=inputs, output=output, gold=gold, split=split)


def _saved_dataset_rows(task: Task, data: DataConfig, path: Path) -> list[Row]:
    """Rows of a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``.

    A DatasetDict's ``train`` and ``test`` splits fix each row's split; rows of other splits (and of
    a plain Dataset without a ``split`` column) are split by hash like file sources.
    """
    if not (path / "dataset_dict.json").is_file() and not (path / "state.json").is_file():
        raise DatasetError(
            f"data.source {data.source!r}: a directory but not a saved HF dataset (no dataset_dict.json or state.json); "
            "pass a directory written by Dataset.save_to_disk / DatasetDict.save_to_disk, or a .jsonl / .csv file"
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as error:
        raise DatasetError(f"data.source {data.source!r}: cannot load the saved dataset ({error}); save it again with save_to_disk") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    rows = []
    for split_name, part in parts:
        missing = [field for field in task.input_fields if field not in part.column_names]
        if missing:
            where = f"split {split_name!r}" if split_name else "the dataset"
            raise DatasetError(
                f"data.source {data.source!r}: {where} has no column {missing[0]!r} (columns: {', '.join(part.column_names)}); "
                "rename the column to the task's input field (dataset.rename_column) or use a task whose input_fields match"
            )
        prefix = f"{path.name}/{split_name}" if split_name else path.name
        for index, record in enumerate(part):
            row = _row_from_record(task, data, record, f"{prefix}:{index}")
            if split_name in SPLITS:
                row = replace(row, split=split_name)
            rows.append(row)
    return rows


def _logged_rows(task: Task, data: DataConfig, target: str) -> list[Row]:
    """Successful exchanges from the request log whose prompt is this task's teacher or student prompt.

    ``target`` is what `stillhouse serve|route --request-log` was given: a SQLite file or a
    ``postgresql://`` URL. The logged output is the teacher's answer; a prompt that matches neither
    template (nor is a routed input, below) keeps empty inputs, so curation drops it as
    ``missing_input`` and the card counts it.
    """
    from serving.request_log import RequestLogError, open_store, parse_target

    try:
        where = parse_target(target)
        store = open_store(where) if not isinstance(where, Path) or where.is_file() else None
    except RequestLogError as error:
        raise DatasetError(f"data.source: {error}") from error  # the message names the target, its password masked
    if store is None:
        raise DatasetError(f"data.source request-log:{target}: no such file; pass the SQLite file or the postgresql:// URL `stillhouse serve|route --request-log` writes")
    selection = data.log_filter
    try:
        logged = store.query(
            route=selection.route,
            arm=selection.arm,
            adapter=selection.adapter,
            since=selection.since.timestamp() if selection.since else None,
            until=selection.until.timestamp() if selection.until else None,
            min_feedback=selection.min_feedback or None,
        )
    finally:
        store.close()
    rows = []
    for item in logged:
        exchange = item.exchange
        if exchange.status != 200 or exchange.output is None:
            continue
        inputs = task.inputs_from_prompt(exchange.prompt) or _routed_input(task, exchange) or {field: "" for field in task.input_fields}
        rows.append(Row(id=exchange.request_id, inputs=inputs, output=exchange.output.strip()))
    return rows


def _routed_input(task: Task, exchange) -> dict[str, str] | None:
    """The router logs what the client sent; on a template route (its arms render their own prompts
    around it, so the row has a template version) that is the value of a one-field task's input."""
    if exchange.route is None or exchange.template_version is None or len(task.input_fields) != 1:
        return None
    return {task.input_fields[0]: exchange.prompt}


def _generated_rows(task: Task, data: DataConfig) -> list[Row]:
    if not task.generator:
        raise DatasetError(f"task {task.name!r} has no generator; set data.source to a .jsonl or .csv file")
    generator = importlib.import_module(task.generator)
    rows = []
    for split, size, generator_split in (("train", data.train_size, "train"), ("test", data.test_size, "heldout")):
        for record in generator.generate(generator_split, size, seed=data.seed):
            rows.append(replace(_row_from_record(task, data, record, record["id"]), split=split))
    return rows
