"""The trainer on the tiny base: servability enforced before training, completion-only loss,
length bucketing, and resume after an interruption giving the very same adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from training import batching, trainer
from training.config import LoraSettings, TrainSettings
from training.row import Row
from training.lora import NotServableConfigError
from training.task import load_task
from training.tasks.sentiment_data import generate

TASK = load_task("demo")


@pytest.fixture(scope="module")
def rows():
    return [Row(id=r["id"], inputs={"review": r["review"]}, output=r["label"]) for r in generate("train", 24, seed=3)]


def test_a_non_servable_lora_config_is_refused_before_any_training(tmp_path, tiny_base_dir, rows, monkeypatch):
    def no_model_loading(*args, **kwargs):
        raise AssertionError("the base model was loaded for a config that cannot be served")

    monkeypatch.setattr(trainer.AutoModelForCausalLM, "from_pretrained", no_model_loading)
    lora = LoraSettings(rank=12, targets=["q_proj", "embed_tokens"])
    with pytest.raises(NotServableConfigError) as caught:
        trainer.train(rows, TASK, tiny_base_dir, lora, TrainSettings(max_steps=2), tmp_path / "run")
    fields = {violation.field for violation in caught.value.violations}
    assert {"r", "target_modules"} <= fields
    assert "refusing to train" in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_labels_cover_only_completion_tokens_and_batches_group_lengths(tiny_base_dir, rows):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    examples, too_long = batching.encode(rows, TASK, tokenizer, max_length=256)
    assert too_long == 0
    batch = batching.collate(examples[:3], tokenizer.pad_token_id)
    for index, example in enumerate(examples[:3]):
        labelled = batch["labels"][index][batch["labels"][index] != batching.IGNORE].tolist()
        assert labelled == example.input_ids[example.prompt_length :]
        assert labelled[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(labelled[:-1]) == TASK.completion(rows[index].output)
    lengths = [5, 50, 6, 51, 7, 52, 8, 53]
    batches = batching.epoch_batches(lengths, batch_size=2, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(abs(lengths[b[0]] - lengths[b[-1]]) <= 2 for b in batches)
    assert batches == batching.epoch_batches(lengths, batch_size=2, seed=0, epoch=0)


class Interrupt(Exception):
    pass


def test_resume_after_interruption_gives_the_same_adapter(tmp_path, tiny_base_dir, rows):
    lora = LoraSettings(rank=8, alpha=16, dropout=0.1, targets=["q_proj", "v_proj"])
    settings = TrainSettings(max_steps=4, batch_size=2, grad_accum=2, lr=5e-3, warmup_ratio=0.25, save_every=2, log_every=1, seed=7)
    quiet = lambda message: None  # noqa: E731

    straight = trainer.train(rows, TASK, tiny_base_dir, lora, settings, tmp_path / "straight", say=quiet)

    def stop_after_three(step):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        trainer.train(rows, TASK, tiny_base_dir, lora, settings, tmp_path / "resumed", say=quiet, on_step=stop_after_three)
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step-*.pt")] == ["step-2.pt"]
    messages = []
    resumed = trainer.train(rows, TASK, tiny_base_dir, lora, settings, tmp_path / "resumed", say=messages.append)
    assert any("resuming from" in message and "(step 2)" in message for message in messages)

    expected = load_file(straight.adapter_dir / "adapter_model.safetensors")
    actual = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert any(expected[key].abs().sum() > 0 for key in expected if "lora_B" in key)  # it did learn something
    curve = json.loads((tmp_path / "resumed" / "loss.json").read_text())
    assert [point["step"] for point in curve] == [1, 2, 3, 4]
    assert curve == json.loads((tmp_path / "straight" / "loss.json").read_text())
    config = json.loads((straight.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"


def test_a_checkpoint_from_other_settings_is_not_resumed(tmp_path, tiny_base_dir, rows):
    lora = LoraSettings(targets=["q_proj"])
    quiet = lambda message: None  # noqa: E731
    trainer.train(rows[:8], TASK, tiny_base_dir, lora, TrainSettings(max_steps=1, batch_size=4), tmp_path / "run", say=quiet)
    with pytest.raises(ValueError, match="other data or settings"):
        trainer.train(rows[:8], TASK, tiny_base_dir, lora, TrainSettings(max_steps=1, batch_size=4, lr=1e-3), tmp_path / "run", say=quiet)
