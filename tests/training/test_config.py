"""Run configs: every problem at once, flags override fields, refusal before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

import stillhouse
from training.config import ConfigError, load_config


def test_every_config_problem_is_reported_with_its_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: r1\nlora: {rank: 8, colour: red}\ntrain: {lr: -1, epochs: 1}\nsurprise: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "3 problem(s)" in message
    assert "lora.colour: unknown key" in message and "surprise: unknown key" in message
    assert "train.lr:" in message


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: r1\nlora: {rank: 8}\n")
    config = load_config(path, {"lora.rank": 16, "train.max_steps": 5, "train.lr": None})
    assert (config.lora.rank, config.train.max_steps, config.train.lr) == (16, 5, 2e-4)


def test_cli_refuses_a_non_servable_rank_before_building_data(tmp_path, capsys, tiny_base_dir):
    code = stillhouse.main(["train", "--task", "demo", "--base", "tiny", "--name", "bad", "--rank", "12", "--runs-dir", str(tmp_path)])
    assert code == 2
    assert "not servable" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "data").exists()


def test_the_shipped_example_config_is_valid():
    config = load_config(Path(__file__).resolve().parents[2] / "training" / "examples" / "sentiment-270m.yaml")
    assert config.teacher.url.startswith("http") and config.data.use_gold_as_output is False
