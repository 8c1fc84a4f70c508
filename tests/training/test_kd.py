"""Logit distillation: the top-k KL term, its alignment with the student's completion ids, the
mixed loss, refusals, and training (with resume) on the tiny base."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from training import batching, losses, trainer
from training.config import LoraSettings, TrainSettings
from training.row import Row
from training.task import load_task
from training.tasks.sentiment_data import generate

TASK = load_task("demo")
quiet = lambda message: None  # noqa: E731


@pytest.fixture(scope="module")
def tokenizer(tiny_base_dir):
    return trainer._tokenizer(str(tiny_base_dir))


@pytest.fixture(scope="module")
def model(tiny_base_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()


def kd_rows(tokenizer, n=12, aligned=None, seed=3):
    """Rows whose teacher generated exactly the student's completion (or its first ``aligned`` ids),
    with a made-up top-3 per generated token that always holds the generated one."""
    rows = []
    for r in generate("train", n, seed=seed):
        answer = tokenizer(TASK.completion(r["label"]), add_special_tokens=False).input_ids
        tokens = list(answer) + [tokenizer.eos_token_id]
        if aligned is not None:
            tokens[aligned:] = [(i + 7) % 1000 for i in tokens[aligned:]]
        top = [[[t, -0.2], [(t + 1) % 1000, -1.9], [(t + 2) % 1000, -3.0]] for t in tokens]
        rows.append(Row(id=r["id"], inputs={"review": r["review"]}, output=r["label"],
                        teacher_tokens=tokens, teacher_top_logprobs=top, teacher_logprob=-0.2 * len(tokens)))
    return rows


# --- the KL term ----------------------------------------------------------------------------


def test_top_k_kl_by_hand():
    student = torch.tensor([[0.0, math.log(2.0), 0.0, math.log(3.0)]])  # q = [1, 2, 1, 3] / 7
    ids = torch.tensor([[1, 0, 2]])
    logprobs = torch.tensor([[math.log(0.6), math.log(0.2), float("-inf")]])  # padding never counts
    p = [0.75, 0.25]  # renormalised over the teacher's top-k
    q = [2 / 7, 1 / 7]
    expected = p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1])
    assert losses.top_k_kl(student, ids, logprobs).item() == pytest.approx(expected, rel=1e-6)


def test_top_k_kl_is_zero_when_the_student_is_the_teacher():
    vocab = 50
    ids = torch.tensor([[4, 9, 17], [0, 1, 2]])
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.1], [0.7, 0.2, 0.1]]))
    student = torch.full((2, vocab), -1e4)
    student.scatter_(1, ids, torch.log_softmax(logprobs, -1))  # all mass on the teacher's top-k, renormalised
    assert torch.allclose(losses.top_k_kl(student, ids, logprobs), torch.zeros(2), atol=1e-6)
    # any other student is penalised, including one that spreads mass outside the top-k
    assert (losses.top_k_kl(torch.zeros(2, vocab), ids, logprobs) > 0.1).all()


# --- alignment and the mixed loss -------------------------------------------------------------


def test_aligned_positions_get_the_teachers_top_k_and_eos_gets_none(tokenizer):
    rows = kd_rows(tokenizer, n=2)
    examples, _ = batching.encode(rows, TASK, tokenizer, 256, kd_top_k=2)
    for example, row in zip(examples, rows):
        completion = example.input_ids[example.prompt_length :]
        assert len(example.teacher_top) == len(completion)
        assert example.teacher_top[-1] is None  # EOS: cross-entropy only
        for student_id, top in zip(completion[:-1], example.teacher_top[:-1]):
            assert top[0] == (student_id, (student_id + 1) % 1000) and top[1] == (-0.2, -1.9)  # k=2 of 3
    # a teacher that parts from the student after one token: only the first position is distilled
    (partial,), _ = batching.encode(kd_rows(tokenizer, n=1, aligned=1), TASK, tokenizer, 256, kd_top_k=3)
    assert partial.teacher_top[0] is not None and all(top is None for top in partial.teacher_top[1:])
    plain, _ = batching.encode(rows, TASK, tokenizer, 256)
    assert all(example.teacher_top == () for example in plain)


def reference_losses(model, batch):
    """Per completion position: CE and top-k KL from a plain full forward."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    selected = targets != batching.IGNORE
    ce = F.cross_entropy(logits[selected], targets[selected], reduction="none")
    kd = batch["kd_mask"][:, 1:][selected]
    kl = torch.zeros_like(ce)
    kl[kd] = losses.top_k_kl(logits[selected][kd], batch["kd_ids"][:, 1:][selected][kd], batch["kd_logprobs"][:, 1:][selected][kd])
    return ce, kl, kd


def test_mixed_loss_matches_a_hand_computed_mix_and_is_ce_at_ratio_zero(model, tokenizer):
    rows = kd_rows(tokenizer, n=3)[:2] + kd_rows(tokenizer, n=1, aligned=1, seed=9)
    examples, _ = batching.encode(rows, TASK, tokenizer, 256, kd_top_k=3)
    batch = batching.collate(examples, tokenizer.pad_token_id)
    ce, kl, kd = reference_losses(model, batch)
    assert 0 < int(kd.sum()) < len(kd)  # EOS and the misaligned row's later positions are CE only
    with torch.no_grad():
        plain, count = losses.completion_loss(model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
        at_zero, _ = losses.completion_loss(model, batch, 0.0)
        half, half_count = losses.completion_loss(model, batch, 0.5)
        full, _ = losses.completion_loss(model, batch, 1.0)
    assert count == half_count == len(ce)
    assert at_zero.item() == plain.item()
    assert plain.item() == pytest.approx(ce.sum().item(), rel=1e-4)
    expected_half = ce[~kd].sum() + (0.5 * ce[kd] + 0.5 * kl[kd]).sum()
    assert half.item() == pytest.approx(expected_half.item(), rel=1e-4)
    # at ratio 1, distilled positions carry the KL alone; the others keep their cross-entropy
    assert full.item() == pytest.approx((ce[~kd].sum() + kl[kd].sum()).item(), rel=1e-4)


# --- refusals ---------------------------------------------------------------------------------


def test_rows_without_teacher_top_k_are_refused(tokenizer):
    rows = [replace(row, teacher_tokens=None, teacher_top_logprobs=None, teacher_logprob=None) for row in kd_rows(tokenizer, n=1)]
    with pytest.raises(ValueError, match=r"no teacher_top_logprobs.*train\.kd_ratio: 0"):
        batching.encode(rows, TASK, tokenizer, 256, kd_top_k=3)


def test_teacher_ids_outside_the_students_vocabulary_are_refused(tokenizer):
    (row,) = kd_rows(tokenizer, n=1)
    tops = row.teacher_top_logprobs
    rows = [replace(row, teacher_top_logprobs=((*tops[0], (len(tokenizer) + 5, -9.0)), *tops[1:]))]
    with pytest.raises(ValueError, match="outside the student's vocabulary.*train.kd_ratio: 0"):
        batching.encode(rows, TASK, tokenizer, 256, kd_top_k=3)


def test_no_aligned_positions_is_refused_before_loading_the_model(tmp_path, tiny_base_dir, tokenizer, monkeypatch):
    def no_model_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(trainer.AutoModelForCausalLM, "from_pretrained", no_model_loading)
    rows = kd_rows(tokenizer, n=2, aligned=0)
    settings = TrainSettings(max_steps=1, batch_size=2, kd_ratio=0.5, kd_top_k=3)
    with pytest.raises(ValueError, match="train.kd_ratio > 0, but no teacher tokens line up"):
        trainer.train(rows, TASK, tiny_base_dir, LoraSettings(targets=["q_proj"]), settings, tmp_path / "run", say=quiet)


# --- training ---------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def test_kd_training_learns_reports_alignment_and_resumes_exactly(tmp_path, tiny_base_dir, tokenizer):
    rows = kd_rows(tokenizer, n=8)
    lora = LoraSettings(rank=8, alpha=16, dropout=0.1, targets=["q_proj", "v_proj"])
    settings = TrainSettings(max_steps=3, batch_size=2, grad_accum=2, lr=5e-3, warmup_ratio=0.0, save_every=1, log_every=1,
                             seed=5, kd_ratio=0.5, kd_top_k=3)
    messages = []
    straight = trainer.train(rows, TASK, tiny_base_dir, lora, settings, tmp_path / "straight", say=messages.append)
    assert any("logit distillation: teacher top-k at" in message for message in messages)
    weights = load_file(straight.adapter_dir / "adapter_model.safetensors")
    assert any(weights[key].abs().sum() > 0 for key in weights if "lora_B" in key)  # it learnt something

    def stop_after_two(step):
        if step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        trainer.train(rows, TASK, tiny_base_dir, lora, settings, tmp_path / "resumed", say=quiet, on_step=stop_after_two)
    resumed = trainer.train(rows, TASK, tiny_base_dir, lora, settings, tmp_path / "resumed", say=quiet)
    again = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert all(torch.equal(weights[key], again[key]) for key in weights)
    assert json.loads((tmp_path / "resumed" / "loss.json").read_text()) == json.loads((tmp_path / "straight" / "loss.json").read_text())

    # other teacher targets (same text) or another ratio: the checkpoint is not resumed
    with pytest.raises(ValueError, match="other data or settings"):
        trainer.train(rows, TASK, tiny_base_dir, lora, settings.model_copy(update={"kd_ratio": 0.3}), tmp_path / "resumed", say=quiet)
    tops = rows[0].teacher_top_logprobs
    changed = [replace(rows[0], teacher_top_logprobs=(((tops[0][0][0], -0.1), *tops[0][1:]), *tops[1:])), *rows[1:]]
    with pytest.raises(ValueError, match="other data or settings"):
        trainer.train(changed, TASK, tiny_base_dir, lora, settings, tmp_path / "resumed", say=quiet)


def test_rows_labelled_by_a_real_server_train_with_kd(tmp_path, tiny_base_dir):
    from tests.serving.server_harness import running_server
    from training.config import EndpointConfig
    from training.endpoint import Endpoint
    from training.labelling import label

    rows = [Row(id=r["id"], inputs={"review": r["review"]}) for r in generate("train", 4, seed=1)]
    with running_server(tiny_base_dir, tmp_path / "registry") as (url, _):
        labelled, report = label(rows, TASK, Endpoint(EndpointConfig(url=url)), tmp_path / "cache.jsonl", top_k=4)
    assert report.failed == 0
    labelled = [row for row in labelled if row.output.strip()]
    messages = []
    settings = TrainSettings(max_steps=2, batch_size=2, lr=5e-3, kd_ratio=0.5, kd_top_k=4)
    trainer.train(labelled, TASK, tiny_base_dir, LoraSettings(targets=["q_proj"]), settings, tmp_path / "run", say=messages.append)
    assert any("logit distillation: teacher top-k at" in message for message in messages)


@pytest.mark.parametrize("kd_ratio, asked", [(0.0, 0), (0.5, 7)])
def test_label_rows_asks_the_teacher_for_top_k_only_with_kd(tmp_path, monkeypatch, kd_ratio, asked):
    from training import dataset, recipe
    from training.config import EndpointConfig, RunConfig
    from training.labelling import LabellingReport

    config = RunConfig(name="kd", runs_dir=str(tmp_path), train={"kd_ratio": kd_ratio, "kd_top_k": 7})
    (config.run_dir / "data").mkdir(parents=True)
    dataset.write_rows(config.run_dir / "data" / "rows.jsonl", [Row(id="a", inputs={"review": "x"})])
    calls = []

    def fake_label(rows, task, teacher, cache, *, relabel, top_k, **variant):  # variant and pool: how the teacher is asked
        calls.append(top_k)
        return rows, LabellingReport(len(rows), 0, len(rows), 0, 0.0)

    monkeypatch.setattr(recipe, "label", fake_label)
    recipe.label_rows(config, TASK, EndpointConfig(url="http://127.0.0.1:9"), quiet)
    assert calls == [asked]
