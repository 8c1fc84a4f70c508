"""The row type: row files round-trip byte for byte, and a key that is not a row's is refused by name."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from training import dataset
from training.row import Row

# a labelled, sampled and judged row as the pipeline writes it (keys in the order the stages add them)
FULL = {
    "id": "r1", "inputs": {"review": "Lovely desk"}, "output": "positive", "gold": "positive", "split": "train",
    "teacher": "lorax:http://t#", "teacher_logprob": -0.25, "teacher_tokens": [4414, 1],
    "teacher_top_logprobs": [[[4414, -0.25], [9, -2.5]], [[1, -0.01]]],
    "teacher_samples": ["positive", "Positive."], "judge_score": None, "judge_output": "positive", "judge_error": "no number",
}
BUILT = {"id": "r2", "inputs": {"review": "Cold soup"}, "output": None, "gold": None, "split": None}


def test_row_files_round_trip_byte_for_byte(tmp_path):
    original = tmp_path / "rows.jsonl"
    original.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in (FULL, BUILT)))
    rows = dataset.read_rows(original)
    assert rows[0].teacher_tokens == (4414, 1) and rows[0].teacher_top_logprobs[0][1] == (9, -2.5)
    assert rows[1] == Row(id="r2", inputs={"review": "Cold soup"})
    dataset.write_rows(tmp_path / "again.jsonl", rows)
    assert (tmp_path / "again.jsonl").read_bytes() == original.read_bytes()


def test_unset_fields_are_not_written_and_a_judge_failure_keeps_its_null_score():
    assert list(Row(id="a", inputs={"review": "x"}).to_json()) == ["id", "inputs", "output", "gold", "split"]
    relabelled = replace(Row.from_json(FULL), teacher_logprob=None)
    assert "teacher_logprob" not in relabelled.to_json() and relabelled.to_json()["judge_score"] is None


def test_an_unknown_key_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(BUILT) + "\n" + json.dumps({**BUILT, "colour": "red"}) + "\n")
    with pytest.raises(dataset.DatasetError, match=r"train\.jsonl:2: unknown key 'colour'; a row has only id, inputs, .*remove the key"):
        dataset.read_rows(path)
    path.write_text(json.dumps({"inputs": {}}) + "\n")
    with pytest.raises(dataset.DatasetError, match=r"train\.jsonl:1: no 'id' key"):
        dataset.read_rows(path)
