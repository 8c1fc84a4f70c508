"""Error review: confusion matrix, worst examples, student/teacher disagreements and the curation
trace, on crafted predictions and through `stillhouse review` on a curated demo run."""

from __future__ import annotations

import json

import stillhouse
from training import recipe
from training.config import load_config
from training.review import UNPARSED, confusion, disagreements, worst_examples
from training.task import load_task


def pred(row_id, reference, parsed, output=None):
    return {"id": row_id, "inputs": {"review": f"text {row_id}"}, "reference": reference, "output": output or str(parsed), "parsed": parsed}


PREDICTIONS = [
    pred("a", "positive", "positive"),
    pred("b", "positive", "negative"),
    pred("c", "negative", None, output="hmm"),
    pred("d", "neutral", "negative"),
    pred("e", "neutral", "negative"),
    pred("f", "negative", "negative"),
]


def test_confusion_matrix_counts_gold_by_predicted_with_unparsed_column():
    task = load_task("demo")
    rows, columns, counts = confusion(task, PREDICTIONS)
    assert columns[-1] == UNPARSED and set(rows) == set(task.output.labels)
    assert counts["positive"]["positive"] == 1 and counts["positive"]["negative"] == 1
    assert counts["negative"][UNPARSED] == 1 and counts["neutral"]["negative"] == 2
    assert sum(sum(row.values()) for row in counts.values()) == len(PREDICTIONS)


def test_worst_examples_put_unparsed_first_then_frequent_confusions():
    worst = worst_examples(load_task("demo"), PREDICTIONS, limit=10)
    assert [w["id"] for w in worst] == ["c", "d", "e", "b"]
    assert worst[0]["why"] == "unparsed output" and worst[1]["gold"] == "neutral"
    assert len(worst_examples(load_task("demo"), PREDICTIONS, limit=2)) == 2


def test_disagreements_join_student_and_teacher_by_id():
    teacher = [pred("a", "positive", "positive"), pred("b", "positive", "positive"), pred("c", "negative", "negative")]
    found = disagreements(PREDICTIONS, teacher)
    assert [(d["id"], d["student"], d["teacher"]) for d in found] == [("b", "negative", "positive"), ("c", UNPARSED, "negative")]


def test_review_cli_writes_markdown_html_and_traces_every_row(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {"name": "rev", "base": "tiny", "data.train_size": 60, "data.test_size": 8})
    task = load_task("demo")
    recipe.build(config, task, lambda _: None)
    card = recipe.curate(config, task, lambda _: None)
    run_dir = tmp_path / "runs" / "rev"
    assert stillhouse.main(["review", "--name", "rev"]) == 2  # no evaluation output yet
    assert "stillhouse eval" in capsys.readouterr().err

    test_rows = [json.loads(line) for line in (run_dir / "data" / "test.jsonl").read_text().splitlines()]
    flip = {"positive": "negative", "negative": "neutral", "neutral": "positive"}
    student = [pred(r["id"], r["gold"], r["gold"] if i % 2 else flip[r["gold"]]) for i, r in enumerate(test_rows)]
    teacher = [pred(r["id"], r["gold"], r["gold"]) for r in test_rows]
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "student.json").write_text(json.dumps({"predictions": student}))
    (run_dir / "eval" / "teacher.json").write_text(json.dumps({"predictions": teacher}))

    assert stillhouse.main(["review", "--name", "rev", "--worst", "3"]) == 0
    review = json.loads((run_dir / "review" / "review.json").read_text())
    wrong = sum(1 for i in range(len(test_rows)) if not i % 2)
    assert review["correct"] == len(test_rows) - wrong
    assert len(review["worst"]) == min(3, wrong) and len(review["disagreements"]) == wrong
    curation = review["curation"]
    assert curation["matches_card"] and curation["card_sha256"] == card["sha256"]
    rows = [json.loads(line) for line in (run_dir / "data" / "rows.jsonl").read_text().splitlines()]
    assert set(curation["rows"]) == {row["id"] for row in rows}
    train_ids = {json.loads(line)["id"] for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()}
    for row_id, entry in curation["rows"].items():
        if row_id in train_ids:
            assert entry["survived"] == ["rule_filter", "near_dedup", "split", "balance"] and entry["split"] == "train"
        elif entry["split"] is None:
            assert entry["dropped_at"] and entry["reason"]
    dropped = sum(step["rows_in"] - step["rows_out"] for step in card["steps"])
    assert sum(1 for entry in curation["rows"].values() if entry["dropped_at"]) == dropped

    markdown = (run_dir / "review" / "review.md").read_text()
    assert "## Confusion matrix" in markdown and "## Student vs teacher" in markdown and "## Curation trace" in markdown
    page = (run_dir / "review" / "review.html").read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "<table>" in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")
