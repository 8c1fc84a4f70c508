"""Error review (playbook practice 11): look at the individual mistakes, and where each row came from.

``stillhouse review --name RUN`` reads the run's evaluation output (``eval/student.json``, or any
file with the same ``predictions`` list via ``--eval``, e.g. ``ablation/100/eval.json``), the
teacher's (``eval/teacher.json``) when present, and the run's data, and writes
``runs/<name>/review/review.md`` and a self-contained ``review.html`` (inline SVG, no external
assets) with:

- the confusion matrix (gold rows × predicted columns, plus ``(unparsed)`` for outputs outside
  the label set; for non-label tasks, parse outcome × correctness);
- the worst examples: wrong predictions, unparsed outputs first, then the most frequent
  confusions first, then test order (the eval output carries no confidences, so no
  confidence ordering is claimed);
- the rows where student and teacher disagree (when the teacher's predictions exist);
- the curation trace: the run's curation is replayed on ``data/rows.jsonl`` with the saved config
  and checked against the dataset card's sha256; each row gets the steps it survived and, for a
  dropped row, the step and reason that dropped it.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from training import curation, dataset
from training.config import RunConfig
from training.row import Row
from training.task import Task, load_task

Say = Callable[[str], None]
UNPARSED = "(unparsed)"


class ReviewError(ValueError):
    """The run lacks what a review needs (its config, data or evaluation output)."""


# --- pure pieces -----------------------------------------------------------------------------


def confusion(task: Task, predictions: list[dict]) -> tuple[list[str], list[str], dict[str, dict[str, int]]]:
    """(row labels, column labels, counts[gold][predicted]) for the predictions."""
    if task.output.type == "labels":
        rows = list(task.output.labels)
        columns = [*rows, UNPARSED]
        key = lambda p: (_gold(task, p), p["parsed"] if p["parsed"] is not None else UNPARSED)  # noqa: E731
    else:
        rows, columns = ["reference"], ["correct", "wrong", UNPARSED]
        key = lambda p: ("reference", UNPARSED if p["parsed"] is None else ("correct" if _correct(task, p) else "wrong"))  # noqa: E731
    counts = {row: {column: 0 for column in columns} for row in rows}
    for prediction in predictions:
        gold, predicted = key(prediction)
        counts.setdefault(gold, {column: 0 for column in columns})[predicted] += 1
    return list(counts), columns, counts


def worst_examples(task: Task, predictions: list[dict], limit: int) -> list[dict]:
    """Wrong predictions: unparsed first, then the most frequent confusions, then test order."""
    wrong = [(position, p) for position, p in enumerate(predictions) if not _correct(task, p)]
    frequency = Counter((_gold(task, p), _show(p["parsed"])) for _, p in wrong)
    ranked = sorted(wrong, key=lambda item: (item[1]["parsed"] is not None, -frequency[(_gold(task, item[1]), _show(item[1]["parsed"]))], item[0]))
    return [{**p, "gold": _gold(task, p), "predicted": _show(p["parsed"]), "why": "unparsed output" if p["parsed"] is None else "wrong answer"}
            for _, p in ranked[:limit]]


def disagreements(student: list[dict], teacher: list[dict]) -> list[dict]:
    """Rows (by id) where the student's and the teacher's parsed answers differ."""
    by_id = {p["id"]: p for p in teacher}
    out = []
    for p in student:
        other = by_id.get(p["id"])
        if other is not None and p["parsed"] != other["parsed"]:
            out.append({"id": p["id"], "inputs": p["inputs"], "reference": p["reference"], "student": _show(p["parsed"]),
                        "teacher": _show(other["parsed"]), "student_output": p["output"], "teacher_output": other["output"]})
    return out


def curation_trace(rows: list[Row], task: Task, config: RunConfig) -> tuple[dict[str, dict], str]:
    """Replay the run's curation: per row id, the steps survived and where/why it was dropped; plus the curated sha256."""
    steps = curation.enabled_steps(task, config.curation, config.data)
    trace = {row.id: {"survived": [], "dropped_at": None, "reason": None, "split": None} for row in rows}
    current = rows
    for name, run_step in steps:
        step = run_step(current)
        for row, reason in step.dropped:
            trace[row.id].update(dropped_at=name, reason=reason)
        for row in step.kept:
            trace[row.id]["survived"].append(name)
        current = step.kept
    for row in current:
        trace[row.id]["split"] = row.split
    return trace, curation.rows_digest(current)


# --- the report ------------------------------------------------------------------------------


def review(run_dir: Path, say: Say, worst: int = 20, eval_path: Path | None = None, teacher_path: Path | None = None) -> list[Path]:
    """Write ``review/review.{md,html,json}`` for the run in ``run_dir``; returns the paths written."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ReviewError(f"{run_dir}: no config.json; is this a run directory (runs/<name>/)?")
    config = RunConfig.model_validate_json(config_file.read_text())
    task = load_task(config.task)
    eval_path = eval_path or run_dir / "eval" / "student.json"
    if not eval_path.is_file():
        raise ReviewError(f"{eval_path}: no evaluation output; run `stillhouse eval --name {run_dir.name} --url URL` first (or pass --eval FILE)")
    student = json.loads(eval_path.read_text())["predictions"]
    teacher_path = teacher_path or run_dir / "eval" / "teacher.json"
    teacher = json.loads(teacher_path.read_text())["predictions"] if teacher_path.is_file() else None

    row_labels, columns, counts = confusion(task, student)
    wrong = worst_examples(task, student, worst)
    disagree = disagreements(student, teacher) if teacher is not None else None
    trace, digest, card_sha = {}, None, None
    data_dir = run_dir / "data"
    if (data_dir / "rows.jsonl").is_file():
        trace, digest = curation_trace(dataset.read_rows(data_dir / "rows.jsonl"), task, config)
        if (data_dir / "card.json").is_file():
            card_sha = json.loads((data_dir / "card.json").read_text())["sha256"]
    correct = sum(1 for p in student if _correct(task, p))
    result = {
        "run": run_dir.name, "task": task.name, "eval": str(eval_path), "rows": len(student), "correct": correct,
        "confusion": {"rows": row_labels, "columns": columns, "counts": counts}, "worst": wrong,
        "disagreements": disagree, "curation": {"replayed_sha256": digest, "card_sha256": card_sha,
                                                "matches_card": digest is not None and digest == card_sha, "rows": trace},
    }
    out_dir = run_dir / "review"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "review.json", out_dir / "review.md", out_dir / "review.html"]
    paths[0].write_text(json.dumps(result, indent=2, default=str) + "\n")
    paths[1].write_text(review_markdown(result))
    paths[2].write_text(review_html(result))
    say(f"review: {correct}/{len(student)} correct, {len(wrong)} worst listed, "
        f"{'no teacher output' if disagree is None else f'{len(disagree)} student/teacher disagreements'}, {len(trace)} rows traced")
    return paths


def _survival_summary(trace: dict[str, dict]) -> tuple[Counter, list[tuple[str, dict]]]:
    fates = Counter()
    for entry in trace.values():
        fates[f"dropped at {entry['dropped_at']} ({entry['reason']})" if entry["dropped_at"] else f"kept ({entry['split']})"] += 1
    return fates, sorted(trace.items())


def review_markdown(result: dict) -> str:
    conf = result["confusion"]
    lines = [f"# Error review: {result['run']} ({result['task']})", "",
             f"Evaluation output `{result['eval']}`: {result['correct']}/{result['rows']} correct.", "",
             "## Confusion matrix (rows: gold, columns: predicted)", "",
             "| gold \\ predicted | " + " | ".join(conf["columns"]) + " |", "|---|" + "---|" * len(conf["columns"])]
    for row in conf["rows"]:
        lines.append(f"| {row} | " + " | ".join(str(conf["counts"][row][column]) for column in conf["columns"]) + " |")
    lines += ["", f"## Worst examples ({len(result['worst'])}; unparsed first, then the most frequent confusions)", "",
              "| id | gold | predicted | output | input |", "|---|---|---|---|---|"]
    for p in result["worst"]:
        lines.append(f"| {p['id']} | {p['gold']} | {p['predicted']} | `{_cell(p['output'])}` | {_cell(_inputs(p['inputs']))} |")
    lines += ["", "## Student vs teacher", ""]
    if result["disagreements"] is None:
        lines.append("No teacher predictions in the evaluation output (run `stillhouse eval --with-teacher`).")
    else:
        lines += [f"{len(result['disagreements'])} rows where they disagree.", "", "| id | reference | student | teacher | input |", "|---|---|---|---|---|"]
        for d in result["disagreements"]:
            lines.append(f"| {d['id']} | {d['reference']} | {d['student']} | {d['teacher']} | {_cell(_inputs(d['inputs']))} |")
    cur = result["curation"]
    lines += ["", "## Curation trace", ""]
    if not cur["rows"]:
        lines.append("No `data/rows.jsonl` in the run.")
    else:
        check = "matches" if cur["matches_card"] else "does NOT match (data or config changed since curation)"
        lines += [f"Curation replayed on `data/rows.jsonl` with the run's config; its sha256 {check} the dataset card.", "",
                  "| fate | rows |", "|---|---|"]
        fates, ordered = _survival_summary(cur["rows"])
        lines += [f"| {fate} | {count} |" for fate, count in fates.most_common()]
        lines += ["", "| row id | steps survived | dropped at (reason) | split |", "|---|---|---|---|"]
        for row_id, entry in ordered:
            dropped = f"{entry['dropped_at']} ({entry['reason']})" if entry["dropped_at"] else "—"
            lines.append(f"| {row_id} | {', '.join(entry['survived']) or '—'} | {dropped} | {entry['split'] or '—'} |")
    return "\n".join(lines) + "\n"


def confusion_svg(conf: dict, cell: int = 54) -> str:
    """The confusion matrix as an inline SVG heat map."""
    rows, columns, counts = conf["rows"], conf["columns"], conf["counts"]
    left, top = 110, 70
    peak = max([1] + [counts[r][c] for r in rows for c in columns])
    width, height = left + cell * len(columns) + 10, top + cell * len(rows) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<text x="{left}" y="14">predicted →</text><text x="4" y="{top - 8}">gold ↓</text>']
    for j, column in enumerate(columns):
        parts.append(f'<text x="{left + j * cell + cell / 2}" y="{top - 8}" text-anchor="middle">{html.escape(column)}</text>')
    for i, row in enumerate(rows):
        parts.append(f'<text x="{left - 6}" y="{top + i * cell + cell / 2 + 4}" text-anchor="end">{html.escape(row)}</text>')
        for j, column in enumerate(columns):
            value = counts[row][column]
            shade = int(255 - 200 * value / peak)
            colour = f"rgb({shade},{shade},255)" if row == column else f"rgb(255,{shade},{shade})"
            parts.append(f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" fill="{colour}" stroke="#999"/>')
            parts.append(f'<text x="{left + j * cell + cell / 2}" y="{top + i * cell + cell / 2 + 4}" text-anchor="middle">{value}</text>')
    parts.append("</svg>")
    return "".join(parts)


def review_html(result: dict) -> str:
    """A self-contained HTML page: the confusion matrix as inline SVG, then the Markdown sections as tables."""
    body = [f"<h1>Error review: {html.escape(result['run'])} ({html.escape(result['task'])})</h1>",
            f"<p>{result['correct']}/{result['rows']} correct ({html.escape(result['eval'])}).</p>",
            "<h2>Confusion matrix</h2>", confusion_svg(result["confusion"])]
    markdown = review_markdown(result).split("\n## ")[2:]  # the sections after the confusion matrix
    for section in markdown:
        title, _, rest = section.partition("\n")
        body.append(f"<h2>{html.escape(title)}</h2>")
        body.append(_markdown_block_to_html(rest))
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>Error review: {html.escape(result['run'])}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def _markdown_block_to_html(text: str) -> str:
    out, table = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if table:
            header, *body = [row for row in table if not all(set(cell) <= {"-"} for cell in row)]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>")
            table = []
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "".join(out)


def _gold(task: Task, prediction: dict) -> str:
    return _show(task.parse(prediction["reference"] or "").value)


def _correct(task: Task, prediction: dict) -> bool:
    return prediction["parsed"] is not None and prediction["parsed"] == task.parse(prediction["reference"] or "").value


def _show(value) -> str:
    if value is None:
        return UNPARSED
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _inputs(inputs: dict) -> str:
    return "; ".join(f"{key}: {value}" for key, value in inputs.items())


def _cell(text: str | None, limit: int = 120) -> str:
    text = (text or "").replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
