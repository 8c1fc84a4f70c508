"""Human corrections through the commands: export the rows worth a look, edit them as a spreadsheet
would, import them as gold overrides recorded in the dataset card, and refuse bad files naming line and column."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest

import stillhouse
from tests.serving.server_harness import serving_in_thread
from tests.training.teacher_upstream import StandInTeacher
from training import dataset, recipe
from training.config import load_config
from training.task import load_task

TASK = load_task("demo")


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A demo run labelled by the stand-in teacher (which never says neutral), one row with split votes, curated and evaluated."""
    monkeypatch.chdir(tmp_path)
    teacher = StandInTeacher()
    with serving_in_thread(teacher.app()) as url:
        config = load_config(None, {"name": "fix", "base": "tiny", "data.train_size": 40, "data.test_size": 16,
                                    "data.use_gold_as_output": False, "teacher.url": url})
        recipe.build(config, TASK, lambda _: None)
        recipe.label_rows(config, TASK, config.teacher, lambda _: None)
    rows_file = config.run_dir / "data" / "rows.jsonl"
    rows = dataset.read_rows(rows_file)
    rows[0] = replace(rows[0], teacher_samples=("positive", "negative", "positive"))
    dataset.write_rows(rows_file, rows)
    recipe.curate(config, TASK, lambda _: None)
    test_rows = dataset.read_rows(config.run_dir / "data" / "test.jsonl")
    predictions = lambda answer: [{"id": r.id, "inputs": r.inputs, "reference": r.gold, "output": answer(r), "parsed": answer(r)} for r in test_rows]  # noqa: E731
    (config.run_dir / "eval").mkdir()
    (config.run_dir / "eval" / "teacher.json").write_text(json.dumps({"predictions": predictions(lambda r: r.output)}))
    (config.run_dir / "eval" / "student.json").write_text(json.dumps({"predictions": predictions(lambda r: "negative")}))
    return config


def read_csv(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_csv(path, records):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def test_export_edit_import_records_the_round_in_the_card_and_keeps_splits(run, capsys):
    assert stillhouse.main(["data", "corrections", "export", "--name", "fix", "--out", "review.csv"]) == 0
    records = read_csv(run.run_dir.parent.parent / "review.csv")
    reasons = {reason for record in records for reason in record["reasons"].split(";")}
    assert reasons == {"student_teacher", "teacher_gold", "low_confidence", "split_vote"}
    assert list(records[0])[:4] == ["id", "split", "reasons", "review"] and all(record["label"] == "" for record in records)
    rows = {row.id: row for row in dataset.read_rows(run.run_dir / "data" / "rows.jsonl")}
    split_vote = next(record for record in records if "split_vote" in record["reasons"])
    assert split_vote["teacher_votes"] == "positive 2, negative 1"
    # every teacher/gold disagreement is listed: the teacher's "so-so" on each neutral row
    assert {r["id"] for r in records if "teacher_gold" in r["reasons"]} == {row.id for row in rows.values() if row.output != row.gold}

    splits_before = {name: {row.id for row in dataset.read_rows(run.run_dir / "data" / f"{name}.jsonl")} for name in ("train", "test")}
    # a person fills the label column: fixing the teacher on neutral rows, and overruling one gold label
    flipped = next(record for record in records if "teacher_gold" not in record["reasons"] and record["split"] == "test")
    for record in records:
        if "teacher_gold" in record["reasons"]:
            record["label"] = record["gold"].upper()  # spelling is normalised to the task's labels
    flipped["label"] = "neutral" if flipped["gold"] != "neutral" else "positive"
    write_csv(run.run_dir.parent.parent / "review.csv", records)
    capsys.readouterr()
    assert stillhouse.main(["data", "corrections", "import", "review.csv", "--name", "fix", "--by", "alice"]) == 0
    assert "corrections applied (1 changed gold)" in capsys.readouterr().out

    fixed = {row.id: row for row in dataset.read_rows(run.run_dir / "data" / "rows.jsonl")}
    assert fixed[flipped["id"]].gold == flipped["label"] and fixed[flipped["id"]].output == rows[flipped["id"]].output  # test rows keep the teacher's output
    for record in records:
        if "teacher_gold" in record["reasons"] and rows[record["id"]].split == "train":
            assert fixed[record["id"]].output == record["gold"]  # a training row learns the human's label
    card = json.loads((run.run_dir / "data" / "card.json").read_text())
    (entry,) = card["corrections"]
    labelled = sum(1 for record in records if record["label"])
    assert (entry["by"], entry["applied"], entry["changed_gold"]) == ("alice", labelled, 1) and entry["at"].endswith("+00:00")
    assert sum(entry["by_split"].values()) == labelled and entry["changes"] == {f"{flipped['gold']} → {flipped['label']}": 1}
    assert "Human corrections" in (run.run_dir / "data" / "card.md").read_text() and "alice" in (run.run_dir / "data" / "card.md").read_text()
    after = {name: {row.id for row in dataset.read_rows(run.run_dir / "data" / f"{name}.jsonl")} for name in ("train", "test")}
    assert not (after["train"] & splits_before["test"]) and not (after["test"] & splits_before["train"])
    # the neutral rows the teacher could not label are now trainable
    assert any(row.output == "neutral" for row in dataset.read_rows(run.run_dir / "data" / "train.jsonl"))

    # the corrected rows are a gold set for the teacher comparison
    teacher = StandInTeacher()
    with serving_in_thread(teacher.app()) as url:
        assert stillhouse.main(["teacher", "compare", "--name", "fix", "--teacher-url", url, "--gold", "corrections", "--variant", "constrain=true"]) == 0
    report = json.loads((run.run_dir / "teacher" / "compare.json").read_text())
    assert report["rows"] == labelled and report["gold"] == "corrections"


def test_a_bad_file_is_refused_whole_naming_line_and_column(run, capsys):
    out = run.run_dir.parent.parent / "review.jsonl"
    assert stillhouse.main(["data", "corrections", "export", "--name", "fix", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) >= 3
    records[0]["label"] = "postive"
    records[1]["label"] = "neutral"
    records[1]["split"] = "test" if records[1]["split"] == "train" else "train"
    records[2]["label"] = "negative"
    records[2]["id"] = "no-such-row"
    out.write_text("".join(json.dumps(record) + "\n" for record in records))
    before = (run.run_dir / "data" / "rows.jsonl").read_text()
    assert stillhouse.main(["data", "corrections", "import", str(out), "--name", "fix"]) == 2
    error = capsys.readouterr().err
    assert "3 problem(s), nothing applied" in error
    assert "line 1, column label: 'postive' is not a valid output; write one of positive, negative, neutral" in error
    assert "line 2, column split" in error and "never moves a row across the train/test split" in error
    assert "line 3, column id: 'no-such-row' is not a row of this run" in error
    assert (run.run_dir / "data" / "rows.jsonl").read_text() == before

    headerless = run.run_dir.parent.parent / "bad.csv"
    headerless.write_text("row,answer\nx,positive\n")
    assert stillhouse.main(["data", "corrections", "import", str(headerless), "--name", "fix"]) == 2
    assert "line 1: no id or label column" in capsys.readouterr().err
