"""Sequence packing: a micro-batch packed into shared rows gives the loss and the adapter that
one row per example gives, on full-attention and on sliding-window (Gemma local) layers."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from training import batching, lora, losses, trainer
from training.config import LoraSettings, TrainSettings
from training.row import Row
from training.task import load_task
from training.tasks.sentiment_data import generate

TASK = load_task("demo")


@pytest.fixture(scope="module")
def rows():
    return [Row(id=r["id"], inputs={"review": r["review"]}, output=r["label"]) for r in generate("train", 16, seed=5)]


@pytest.fixture(scope="module")
def examples(tiny_base_dir, rows):
    tokenizer = trainer._tokenizer(str(tiny_base_dir))
    encoded, _ = batching.encode(rows, TASK, tokenizer, max_length=256)
    # Teacher targets on the first completion token of every other example, so packing must carry them too.
    with_targets = []
    for index, example in enumerate(encoded):
        first = example.input_ids[example.prompt_length]
        top = ((first, 7, 9), (-0.2, -1.9, -3.0)) if index % 2 == 0 else None
        completion = len(example.input_ids) - example.prompt_length
        with_targets.append(batching.Example(example.input_ids, example.prompt_length, (top,) + (None,) * (completion - 1)))
    return with_targets


def test_packing_fills_rows_without_losing_or_moving_a_token(examples):
    width = 2 * max(len(example.input_ids) for example in examples)
    batch = batching.collate(examples, pad_id=0, pack_width=width)
    assert batch["input_ids"].shape[0] < len(examples)
    assert batch["input_ids"].shape[1] <= width
    plain = batching.collate(examples, pad_id=0)
    assert int(batch["attention_mask"].sum()) == int(plain["attention_mask"].sum())
    assert int((batch["labels"] != batching.IGNORE).sum()) == int((plain["labels"] != batching.IGNORE).sum())
    assert int(batch["kd_mask"].sum()) == int(plain["kd_mask"].sum()) == (len(examples) + 1) // 2
    for row in range(batch["input_ids"].shape[0]):  # positions restart at every example
        starts = (batch["position_ids"][row] == 0) & (batch["segments"][row] >= 0)
        assert int(starts.sum()) == len(set(batch["segments"][row][batch["segments"][row] >= 0].tolist()))


def test_sliding_window_mask_limits_local_layers_only():
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, -1]])
    masks = batching.packed_attention(segments, torch.float32, sliding_window=2)
    full, local = (masks[name][0, 0] == 0 for name in ("full_attention", "sliding_attention"))
    assert full[3].tolist() == [True, True, True, True, False, False, False]
    assert local[3].tolist() == [False, False, True, True, False, False, False]
    assert full[5].tolist() == [False, False, False, False, True, True, False]
    assert full[6].tolist() == [False] * 6 + [True]  # padding attends to itself, so no row is empty
    assert isinstance(batching.packed_attention(segments, torch.float32, sliding_window=64), torch.Tensor)


def _lora_model(base_dir, sliding_window=None):
    config = AutoConfig.from_pretrained(base_dir)
    if sliding_window is None:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    else:
        config.sliding_window = sliding_window
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(model, lora.lora_config(LoraSettings(), "tiny"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("sliding_window", [None, 4], ids=["full-attention", "window-4"])
def test_packed_loss_equals_one_row_per_example(tiny_base_dir, examples, sliding_window):
    model = _lora_model(tiny_base_dir, sliding_window)
    width = 3 * max(len(example.input_ids) for example in examples)
    with torch.no_grad():
        for kd_ratio in (0.0, 0.5):
            plain, plain_count = losses.completion_loss(model, batching.collate(examples, 0), kd_ratio)
            packed, packed_count = losses.completion_loss(model, batching.collate(examples, 0, pack_width=width), kd_ratio)
            assert packed_count == plain_count
            assert packed.item() == pytest.approx(plain.item(), rel=1e-5)


def test_training_with_packing_gives_the_adapter_of_training_without(tmp_path, tiny_base_dir, rows):
    lora = LoraSettings(dropout=0.0)
    adapters = {}
    for packing in (False, True):
        settings = TrainSettings(max_steps=3, batch_size=4, lr=1e-3, packing=packing, max_length=128)
        result = trainer.train(rows, TASK, tiny_base_dir, lora, settings, tmp_path / str(packing), say=lambda _: None)
        adapters[packing] = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert adapters[True].keys() == adapters[False].keys()
    moved = False
    for name, weights in adapters[False].items():
        torch.testing.assert_close(adapters[True][name], weights, rtol=1e-4, atol=1e-5)
        moved |= "lora_B" in name and bool(weights.abs().sum() > 0)
    assert moved  # training changed the weights, so equality is not the untrained zeros
