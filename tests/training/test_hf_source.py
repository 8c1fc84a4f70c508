"""A local HF `datasets` directory (save_to_disk) as a data source."""

from __future__ import annotations

import datasets
import pytest

from training import curation, dataset
from training.config import CurationConfig, DataConfig
from training.task import load_task

TASK = load_task("demo")


def records(n, prefix="Review"):
    return {"review": [f"{prefix} {i} of the oak desk" for i in range(n)], "label": ["positive", "negative"] * (n // 2)}


def test_a_saved_dataset_round_trips_and_gets_hash_splits(tmp_path):
    datasets.Dataset.from_dict(records(6)).save_to_disk(str(tmp_path / "flat"))
    rows = dataset.load_rows(TASK, DataConfig(source=str(tmp_path / "flat")))
    assert [r.id for r in rows] == [f"flat:{i}" for i in range(6)]
    assert rows[1].to_json() == {"id": "flat:1", "inputs": {"review": "Review 1 of the oak desk"}, "output": "negative", "gold": "negative", "split": None}
    curated, _ = curation.curate(rows, TASK, CurationConfig(dedup=False, balance=False), DataConfig(test_fraction=0.5))
    assert {r.split for r in curated} <= {"train", "test"} and len(curated) == 6


def test_a_saved_dataset_dict_fixes_train_and_test(tmp_path):
    saved = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(records(4)),
            "test": datasets.Dataset.from_dict(records(2, "Held out")),
            "validation": datasets.Dataset.from_dict(records(2, "Extra")),
        }
    )
    saved.save_to_disk(str(tmp_path / "dict"))
    rows = dataset.load_rows(TASK, DataConfig(source=str(tmp_path / "dict")))
    by_split = {name: [r.id for r in rows if r.split == name] for name in ("train", "test", None)}
    assert by_split == {"train": [f"dict/train:{i}" for i in range(4)], "test": ["dict/test:0", "dict/test:1"], None: ["dict/validation:0", "dict/validation:1"]}
    assert rows[4].inputs == {"review": "Held out 0 of the oak desk"}


def test_a_directory_that_is_not_a_saved_dataset_is_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "rows.jsonl").write_text("{}\n")
    with pytest.raises(dataset.DatasetError, match=r"data.source .*plain.*not a saved HF dataset.*save_to_disk"):
        dataset.load_rows(TASK, DataConfig(source=str(tmp_path / "plain")))


def test_a_missing_input_column_names_the_column_and_fix(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"], "label": ["positive"]})}).save_to_disk(str(tmp_path / "wrong"))
    with pytest.raises(dataset.DatasetError, match=r"data.source .*split 'train' has no column 'review' \(columns: text, label\); rename the column"):
        dataset.load_rows(TASK, DataConfig(source=str(tmp_path / "wrong")))
