"""The adapter registry: versions, metadata, removal, id validation, concurrency, and the CLI."""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import stillhouse
from serving import servability
from serving.errors import AdapterNotFoundError, AdapterNotServableError, ValidationError
from serving.registry import METADATA_FILE, NotServableError, Registry
from tests.lora_factory import ALL_PROJECTIONS, make_lora_adapter


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    config = Gemma3TextConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, intermediate_size=128, vocab_size=1000,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "gemma"
    Gemma3ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(base_dir, tmp_path_factory) -> Path:
    return make_lora_adapter(base_dir, tmp_path_factory.mktemp("adapter") / "good")


@pytest.fixture(scope="module")
def dora_adapter(base_dir, tmp_path_factory) -> Path:
    return make_lora_adapter(base_dir, tmp_path_factory.mktemp("adapter") / "dora", use_dora=True)


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


def _assert_complete(entry) -> None:
    """Every stored file is there and the weights are the ones the metadata describes."""
    for name in (servability.CONFIG_FILE, servability.WEIGHTS_FILE, METADATA_FILE):
        assert (entry.path / name).is_file(), (entry.id, name)
    digest = hashlib.sha256((entry.path / servability.WEIGHTS_FILE).read_bytes()).hexdigest()
    assert json.loads((entry.path / METADATA_FILE).read_text())["sha256"] == digest


def test_versions_increment_and_resolve(registry, adapter, base_dir):
    first = registry.add(adapter, "sentiment", base_dir=base_dir)
    second = registry.add(adapter, "sentiment", base_dir=base_dir)
    other = registry.add(adapter, "alpha", base_dir=base_dir)
    assert (first.id, second.id, other.id) == ("sentiment@v1", "sentiment@v2", "alpha@v1")
    assert second.path == registry.root / "sentiment" / "v2"
    assert registry.resolve("sentiment").id == "sentiment@v2"
    assert registry.resolve("sentiment@v1").id == "sentiment@v1"
    assert [entry.id for entry in registry.list()] == ["alpha@v1", "sentiment@v1", "sentiment@v2"]
    assert (second.path / "README.md").is_file()  # peft's model card travels with the weights
    _assert_complete(second)


def test_metadata_is_filled_and_merged(registry, adapter, base_dir):
    entry = registry.add(adapter, "sentiment", base_dir=base_dir, metadata={"lineage": {"teacher": "gemma-3-270m 6-shot"}, "note": "first"})
    meta = entry.metadata
    assert meta["base_model"] == servability.base_names(base_dir)[0]
    assert meta["base_path"] == str(base_dir.resolve())
    assert (meta["rank"], meta["alpha"], meta["profile"], meta["use_rslora"]) == (8, 16.0, "strict", False)
    assert meta["target_modules"] == sorted(ALL_PROJECTIONS)
    assert datetime.fromisoformat(meta["created"]).utcoffset().total_seconds() == 0
    assert meta["source_path"] == str(adapter.resolve())
    assert meta["sha256"] == hashlib.sha256((adapter / servability.WEIGHTS_FILE).read_bytes()).hexdigest()
    assert (meta["metrics"], meta["lineage"], meta["note"]) == ({}, {"teacher": "gemma-3-270m 6-shot"}, "first")
    assert registry.resolve(entry.id).metadata == meta

    registry.update_metadata("sentiment", metrics={"accuracy": 0.9})
    updated = registry.update_metadata("sentiment@v1", metrics={"f1": 0.8}, lineage={"dataset": "reviews-v3"})
    assert updated.metadata["metrics"] == {"accuracy": 0.9, "f1": 0.8}
    assert updated.metadata["lineage"] == {"teacher": "gemma-3-270m 6-shot", "dataset": "reviews-v3"}
    assert registry.resolve("sentiment").metadata == updated.metadata


def test_fixed_metadata_fields_refused(registry, adapter, base_dir):
    with pytest.raises(ValidationError, match="sha256"):
        registry.add(adapter, "sentiment", base_dir=base_dir, metadata={"sha256": "0" * 64})
    registry.add(adapter, "sentiment", base_dir=base_dir)
    with pytest.raises(ValidationError, match="rank"):
        registry.update_metadata("sentiment", rank=16)


def test_remove_one_version_then_all(registry, adapter, base_dir):
    for _ in range(3):
        registry.add(adapter, "sentiment", base_dir=base_dir)
    assert [entry.id for entry in registry.remove("sentiment@v2")] == ["sentiment@v2"]
    assert [entry.id for entry in registry.list()] == ["sentiment@v1", "sentiment@v3"]
    assert not (registry.root / "sentiment" / "v2").exists()
    with pytest.raises(AdapterNotFoundError, match=r"sentiment@v1, sentiment@v3"):
        registry.resolve("sentiment@v2")

    assert [entry.id for entry in registry.remove("sentiment")] == ["sentiment@v1", "sentiment@v3"]
    assert registry.list() == []
    with pytest.raises(AdapterNotFoundError, match="stillhouse adapters add"):
        registry.resolve("sentiment")
    with pytest.raises(AdapterNotFoundError, match="'sentiment'"):
        registry.remove("sentiment")
    # Servers cache adapters by id, so a removed version number is never handed out again.
    assert registry.add(adapter, "sentiment", base_dir=base_dir).id == "sentiment@v4"


def test_unknown_adapter_lists_what_exists(registry, adapter, base_dir):
    with pytest.raises(AdapterNotFoundError, match="registry is empty"):
        registry.resolve("nope")
    registry.add(adapter, "alpha", base_dir=base_dir)
    with pytest.raises(AdapterNotFoundError, match="'nope'.*holds alpha") as raised:
        registry.resolve("nope")
    assert raised.value.status_code == 424
    with pytest.raises(AdapterNotFoundError, match="alpha@v1"):
        registry.remove("alpha@v7")


@pytest.mark.parametrize(
    "adapter_id", ["../x", "/etc/passwd", "a/b", "..", ".hidden", "x@v1/../../y", "x@vfoo", "", "x@v0", "x@v1@v2", "a..b", "x" * 65, "x y"]
)
def test_malformed_ids_refused(registry, adapter, base_dir, adapter_id):
    for action in (registry.resolve, registry.remove, lambda i: registry.update_metadata(i, note="x")):
        with pytest.raises(ValidationError, match="NAME@vN") as raised:
            action(adapter_id)
        assert repr(adapter_id) in raised.value.message
    if "@" not in adapter_id:
        with pytest.raises(ValidationError, match="NAME@vN"):
            registry.add(adapter, adapter_id, base_dir=base_dir)
    assert not registry.root.exists() or [p.name for p in registry.root.iterdir() if not p.name.startswith(".")] == []


def test_symlink_out_of_the_registry_refused(registry, adapter, base_dir, tmp_path):
    registry.add(adapter, "alpha", base_dir=base_dir)
    outside = tmp_path / "outside"
    (outside / "v1").mkdir(parents=True)
    (outside / "v1" / METADATA_FILE).write_text("{}")
    (registry.root / "escape").symlink_to(outside)
    with pytest.raises(ValidationError, match="leaves the registry"):
        registry.resolve("escape")
    assert [entry.id for entry in registry.list()] == ["alpha@v1"]


def _copy_of(adapter: Path, into: Path) -> Path:
    into.mkdir(parents=True)
    for path in adapter.iterdir():
        (into / path.name).write_bytes(path.read_bytes())
    return into


def test_a_link_that_leaves_the_adapter_directory_is_refused_naming_the_file(registry, adapter, base_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the registry")
    linked = _copy_of(adapter, tmp_path / "linked")
    (linked / "README.md").unlink(missing_ok=True)
    (linked / "README.md").symlink_to(secret)
    with pytest.raises(NotServableError) as raised:
        registry.add(linked, "linked", base_dir=base_dir)
    [violation] = raised.value.violations
    assert violation.field == "README.md" and str(secret) in violation.reason and "README.md" in raised.value.message
    assert registry.list() == []


def test_only_regular_files_are_copied_and_links_inside_the_directory_are_read(registry, adapter, base_dir, tmp_path):
    source = _copy_of(adapter, tmp_path / "inside")
    (source / "notes.md").write_text("kept")
    (source / "README.md").unlink(missing_ok=True)
    (source / "README.md").symlink_to(source / "notes.md")
    entry = registry.add(source, "inside", base_dir=base_dir)
    copied = entry.path / "README.md"
    assert not copied.is_symlink() and copied.read_text() == "kept"
    fifo = _copy_of(adapter, tmp_path / "fifo")
    (fifo / "tokenizer.json").unlink(missing_ok=True)
    os.mkfifo(fifo / "tokenizer.json")  # copying it would block forever
    with pytest.raises(NotServableError, match="tokenizer.json"):
        registry.add(fifo, "fifo", base_dir=base_dir)


def test_unservable_adapter_refused_and_nothing_written(registry, dora_adapter, base_dir):
    with pytest.raises(NotServableError) as raised:
        registry.add(dora_adapter, "dora", base_dir=base_dir)
    error = raised.value
    assert isinstance(error, AdapterNotServableError) and error.status_code == 424
    assert "use_dora" in [v.field for v in error.violations] and len(error.violations) > 1
    assert "strict profile" in error.message and "use_dora" in error.message
    assert not registry.root.exists()
    assert registry.list() == []


def test_profile_decides_what_is_added(registry, base_dir, tmp_path):
    rank_12 = make_lora_adapter(base_dir, tmp_path / "r12", r=12)
    with pytest.raises(NotServableError):
        registry.add(rank_12, "wide", base_dir=base_dir)
    assert registry.add(rank_12, "wide", base_dir=base_dir, profile="lorax").metadata["profile"] == "lorax"


def test_concurrent_thread_adds_get_distinct_complete_versions(registry, adapter, base_dir):
    servability.check_adapter(adapter, base_dir)  # build the base's module table before the race
    start = threading.Barrier(8)
    entries, errors = [], []

    def add() -> None:
        start.wait()
        try:
            entries.append(registry.add(adapter, "race", base_dir=base_dir))
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=add) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(entry.version for entry in entries) == list(range(1, 9))
    assert [entry.id for entry in registry.list()] == [f"race@v{n}" for n in range(1, 9)]
    for entry in registry.list():
        _assert_complete(entry)
    assert list((registry.root / ".tmp").iterdir()) == []


def _add_in_process(root: str, src: str, base_dir: str) -> None:
    Registry(Path(root)).add(Path(src), "race", base_dir=Path(base_dir))


def test_concurrent_process_adds_wait_for_the_lock_and_get_distinct_versions(registry, adapter, base_dir):
    registry.root.mkdir(parents=True)
    context = multiprocessing.get_context("fork")
    with open(registry.root / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as another writer would
        processes = [context.Process(target=_add_in_process, args=(str(registry.root), str(adapter), str(base_dir))) for _ in range(3)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + 60
        while len(list((registry.root / ".tmp").glob("race.*"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert registry.list() == []  # every process staged its copy and now waits for the lock
        fcntl.flock(held, fcntl.LOCK_UN)
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0, 0]
    assert [entry.id for entry in registry.list()] == ["race@v1", "race@v2", "race@v3"]
    for entry in registry.list():
        _assert_complete(entry)


def test_cli_add_list_show_rm(tmp_path, adapter, dora_adapter, base_dir, capsys):
    common = ["--registry", str(tmp_path / "registry")]
    assert stillhouse.main(["adapters", "list", *common]) == 0
    assert "registry is empty" in capsys.readouterr().out

    assert stillhouse.main(["adapters", "add", str(adapter), "--name", "sentiment", "--base", str(base_dir), *common]) == 0
    assert "added sentiment@v1" in capsys.readouterr().out
    assert stillhouse.main(["adapters", "add", str(dora_adapter), "--name", "dora", "--base", str(base_dir), *common]) == 1
    assert "  - use_dora: DoRA" in capsys.readouterr().err

    assert stillhouse.main(["adapters", "list", *common]) == 0
    assert "sentiment@v1" in capsys.readouterr().out
    assert stillhouse.main(["adapters", "show", "sentiment", *common]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["id"], shown["rank"]) == ("sentiment@v1", 8)
    assert stillhouse.main(["adapters", "show", "../etc", *common]) == 1
    assert "invalid adapter id" in capsys.readouterr().err

    assert stillhouse.main(["adapters", "rm", "sentiment", *common]) == 0
    assert "removed sentiment@v1" in capsys.readouterr().out
    assert stillhouse.main(["adapters", "rm", "sentiment", *common]) == 1
    assert "not in the registry" in capsys.readouterr().err
