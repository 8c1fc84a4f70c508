"""Sweeps: one field changed per variant, every configuration checked servable before anything
trains, and `stillhouse sweep` end to end on the tiny base with a sorted table."""

from __future__ import annotations

import json

import pytest

import stillhouse
from training.config import ConfigError, load_config
from training.sweep import SweepRefusedError, parse_vary, variants


def base_config(**overrides):
    return load_config(None, {"name": "sw", "base": "tiny", **overrides})


def test_parse_vary_types_values_and_rejects_unknown_names():
    assert parse_vary(["rank=8,16", "lr=1e-4,5e-4", "targets=q_proj+v_proj"]) == {
        "rank": [8, 16], "lr": [1e-4, 5e-4], "targets": [["q_proj", "v_proj"]]}
    for bad in (["colour=red"], ["rank="], ["rank=eight"]):
        with pytest.raises(ConfigError):
            parse_vary(bad)


def test_each_variant_changes_exactly_one_field_and_base_values_are_not_repeated():
    base = base_config()
    configs = variants(base, parse_vary(["rank=8,16", "lr=1e-4,5e-4", "max_label_ratio=3"]))
    assert [v.label for v in configs] == ["base", "rank=16", "lr=0.0001", "lr=0.0005", "max_label_ratio=3.0"]
    reference = base.model_dump()
    for variant in configs[1:]:
        dumped = variant.config.model_dump()
        changed = [f"{section}.{key}" for section in ("lora", "train", "curation", "data")
                   for key in reference[section] if reference[section][key] != dumped[section][key]]
        assert changed == [variant.field]


def test_invalid_value_refuses_the_sweep():
    with pytest.raises(SweepRefusedError, match="dropout"):
        variants(base_config(), parse_vary(["dropout=0.1,1.5"]))


def test_non_servable_value_is_refused_up_front_and_nothing_trains(tmp_path, tiny_base_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["sweep", "--task", "demo", "--base", "tiny", "--name", "bad", "--vary", "rank=12,16", "--vary", "targets=q_proj+embed_tokens", "--max-steps", "1"]
    assert stillhouse.main(argv) == 2
    error = capsys.readouterr().err
    assert "rank=12 (strict profile)" in error and "embed_tokens" in error and "rank=16" not in error
    assert not (tmp_path / "runs" / "bad").exists()  # no data built, nothing trained


def test_sweep_cli_trains_each_variant_and_sorts_by_the_primary_metric(tmp_path, tiny_base_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["sweep", "--task", "demo", "--base", "tiny", "--name", "sw", "--vary", "rank=8,16", "--max-steps", "1",
            "--train-size", "30", "--test-size", "6", "--batch-size", "4", "--eval-limit", "3"]
    assert stillhouse.main(argv) == 0
    out_dir = tmp_path / "runs" / "sw" / "sweep"
    report = json.loads((out_dir / "sweep.json").read_text())
    results = report["results"]
    assert sorted(r["variant"] for r in results) == ["base", "rank=16"]
    keys = [(-r["accuracy"], r["final_loss"]) for r in results]
    assert keys == sorted(keys)
    assert {r["changed"] for r in results} == {None, "lora.rank"}
    assert all(r["test_rows"] == 3 for r in results)
    assert (out_dir / "rank=16" / "train" / "adapter" / "adapter_config.json").is_file()
    table = (out_dir / "sweep.md").read_text()
    assert "each variant changes exactly one field" in table and "`lora.rank` = 16" in table
    assert "| 1 |" in capsys.readouterr().out


def test_logit_distillation_weight_is_a_sweep_parameter():
    base = base_config(**{"train.kd_ratio": 0.5, "train.kd_top_k": 5})
    configs = variants(base, parse_vary(["kd_ratio=0,1"]))
    assert [(v.label, v.field, v.config.train.kd_ratio) for v in configs] == [
        ("base", None, 0.5), ("kd_ratio=0.0", "train.kd_ratio", 0.0), ("kd_ratio=1.0", "train.kd_ratio", 1.0)]
    with pytest.raises(SweepRefusedError, match="kd_ratio"):
        variants(base, parse_vary(["kd_ratio=1.5"]))
