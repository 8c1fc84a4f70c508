"""Each curation step on crafted rows, sources (JSONL, CSV, request log), and the dataset card."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone

from serving.request_log import Exchange, Feedback, SQLiteStore
from training import curation, dataset
from training.config import CurationConfig, DataConfig, LogFilter
from training.row import Row
from training.task import load_task

TASK = load_task("demo")


def row(row_id, review, output, split=None, gold=None):
    return Row(id=row_id, inputs={"review": review}, output=output, gold=gold, split=split)


def test_rule_filter_drops_malformed_rows_with_their_reason():
    rows = [
        row("ok", "The soup was great.", "Positive"),
        row("no-input", "   ", "positive"),
        row("not-a-label", "The soup was great.", "delicious"),
        row("no-output", "The soup was great.", None),
        row("long", "x" * 50, "neutral"),
    ]
    step = curation.rule_filter(rows, TASK, CurationConfig(max_chars=40))
    assert [kept.id for kept in step.kept] == ["ok"]
    assert step.kept[0].output == "positive"  # canonical label spelling
    reasons = {dropped.id: reason for dropped, reason in step.dropped}
    assert reasons == {"no-input": "missing_input", "not-a-label": "output_not_a_label", "no-output": "missing_output", "long": "too_long"}
    report = step.report(len(rows))
    assert report["rows_in"] == 5 and report["rows_out"] == 1
    assert report["dropped"]["missing_input"] == 1 and report["examples"]["too_long"] == ["long"]


def test_input_regex_filter():
    step = curation.rule_filter([row("a", "The soup was great.", "positive"), row("b", "ok", "neutral")], TASK, CurationConfig(input_regex=r"\w+ \w+"))
    assert [dropped.id for dropped, reason in step.dropped if reason == "input_regex_mismatch"] == ["b"]


def test_near_duplicates_across_the_split_lose_their_training_copy():
    rows = [
        row("train-copy", "The hotel room was really clean and the staff were friendly at every hour.", "positive", split="train"),
        row("other", "The laptop charger broke after a single week of use at home.", "negative", split="train"),
        row("test-copy", "The hotel room was really clean and the staff were friendly at every hour!", "positive", split="test"),
        row("unsplit-copy", "the hotel room was really clean and the staff were friendly at every hour", "positive"),
    ]
    step = curation.near_dedup(rows, TASK, threshold=0.8, num_perm=128)
    assert sorted(kept.id for kept in step.kept) == ["other", "test-copy"]
    assert sorted(dropped.id for dropped, reason in step.dropped) == ["train-copy", "unsplit-copy"]
    assert {reason for _, reason in step.dropped} == {"near_duplicate"}


def test_dedup_runs_before_the_split_so_no_pair_straddles_it():
    base = "The {} was really good and I would happily come back to this place again soon"
    rows = [row(f"r{i}", base.format("pasta" if i % 2 else "pizza"), "positive") for i in range(40)]
    rows += [row(f"u{i}", f"Unique review number {i} about topic {i * 7} with words {i * 13}", "neutral") for i in range(40)]
    curated, reports = curation.curate(rows, TASK, CurationConfig(balance=False), DataConfig(test_fraction=0.3))
    assert [report["step"] for report in reports] == ["rule_filter", "near_dedup", "split"]
    texts = {split: {r.inputs["review"].lower() for r in curated if r.split == split} for split in ("train", "test")}
    assert not texts["train"] & texts["test"]
    assert reports[1]["dropped"]["near_duplicate"] == 38


def test_split_is_a_stable_function_of_the_input():
    rows = [row(f"r{i}", f"review {i}", "neutral") for i in range(200)]
    first = {r.id: r.split for r in dataset.assign_splits(rows, TASK, 0.2, seed=0)}
    again = {r.id: r.split for r in dataset.assign_splits(list(reversed(rows)) + [row("new", "another", "positive")], TASK, 0.2, seed=0)}
    assert all(again[key] == value for key, value in first.items())
    assert 20 <= sum(1 for value in first.values() if value == "test") <= 60


def test_balance_caps_training_labels_and_leaves_test_alone():
    rows = [row(f"p{i}", f"p {i}", "positive", split="train") for i in range(30)]
    rows += [row(f"n{i}", f"n {i}", "negative", split="train") for i in range(5)]
    rows += [row(f"t{i}", f"t {i}", "positive", split="test") for i in range(30)]
    step = curation.balance(rows, TASK, CurationConfig(max_label_ratio=2.0), seed=0)
    kept_train = [r for r in step.kept if r.split == "train"]
    assert sum(r.output == "positive" for r in kept_train) == 10
    assert sum(r.output == "negative" for r in kept_train) == 5
    assert sum(r.split == "test" for r in step.kept) == 30
    assert step.report(len(rows))["dropped"] == {"over_cap:positive": 20}


def test_jsonl_and_csv_sources_and_the_card(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({"review": f"Review {i} of the desk", "label": "neutral"}) for i in range(5)) + "\n")
    rows = dataset.load_rows(TASK, DataConfig(source=str(jsonl)))
    assert len(rows) == 5 and rows[0].output == "neutral" and rows[0].gold == "neutral"

    with (tmp_path / "rows.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "review", "output"])
        writer.writeheader()
        writer.writerow({"id": "a", "review": "Lovely chair", "output": "positive"})
        writer.writerow({"id": "b", "review": "", "output": "negative"})
    rows = dataset.load_rows(TASK, DataConfig(source=str(tmp_path / "rows.csv")))
    curated, reports = curation.curate(rows, TASK, CurationConfig(), DataConfig())
    card = curation.dataset_card(TASK, "rows.csv", curated, reports, "gold labels")
    curation.write_card(tmp_path / "card", card)
    markdown = (tmp_path / "card" / "card.md").read_text()
    assert "| rule_filter | 2 | 1 | missing_input: 1 |" in markdown
    assert json.loads((tmp_path / "card" / "card.json").read_text())["steps"][0]["examples"] == {"missing_input": ["b"]}


def test_request_log_source_selects_by_route_and_feedback(tmp_path):
    path = tmp_path / "log.sqlite"
    store = SQLiteStore(path)
    when = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
    exchanges = [
        Exchange(request_id="r1", prompt=TASK.teacher_prompt({"review": "Great desk"}), protocol="lorax", route="sentiment", output=" positive", ts=when),
        Exchange(request_id="r2", prompt=TASK.teacher_prompt({"review": "Awful desk"}), protocol="lorax", route="sentiment", output=" negative", ts=when),
        Exchange(request_id="r3", prompt=TASK.teacher_prompt({"review": "Other route"}), protocol="lorax", route="other", output="positive", ts=when),
        Exchange(request_id="r4", prompt="Unrelated prompt", protocol="lorax", route="sentiment", output="positive", ts=when),
        Exchange(request_id="r5", prompt=TASK.teacher_prompt({"review": "Failed"}), protocol="lorax", route="sentiment", status=500, ts=when),
    ]
    store.write(exchanges, [Feedback("r1", "thumbs", 1.0), Feedback("r2", "thumbs", 0.0), Feedback("r4", "thumbs", 1.0)])
    store.close()

    config = DataConfig(source=f"request-log:{path}", log_filter=LogFilter(route="sentiment"))
    rows = dataset.load_rows(TASK, config)
    assert [r.id for r in rows] == ["r1", "r2", "r4"]
    assert rows[0].inputs == {"review": "Great desk"} and rows[0].output == "positive"
    assert rows[2].inputs == {"review": ""}  # not this task's prompt: curation drops it as missing_input

    liked = dataset.load_rows(TASK, DataConfig(source=f"request-log:{path}", log_filter=LogFilter(route="sentiment", min_feedback={"thumbs": 0.5})))
    assert [r.id for r in liked] == ["r1", "r4"]


def test_request_log_source_reads_a_template_routes_client_input(tmp_path):
    """The router logs the client's prompt; on a template route (a template version is logged) that is the input."""
    path = tmp_path / "log.sqlite"
    store = SQLiteStore(path)
    store.write([
        Exchange(request_id="t1", prompt="Great desk", protocol="openai_completions", route="sentiment", arm="teacher",
                 template_version="abc123", output=" positive"),
        Exchange(request_id="p1", prompt="Great desk", protocol="lorax", route="sentiment", arm="teacher", output=" positive"),
    ], [])
    store.close()
    rows = dataset.load_rows(TASK, DataConfig(source=f"request-log:{path}", log_filter=LogFilter(route="sentiment")))
    assert [(row.id, row.inputs) for row in rows] == [("t1", {"review": "Great desk"}), ("p1", {"review": ""})]
