"""LoRA supervised fine-tuning of the student prompt → teacher output (sequence-level distillation).

The loop, read top to bottom: setup (servability guard, examples, model, optimiser, resume) →
optimiser steps → report (adapter, loss curve). Its parts live beside it:

- :mod:`training.lora`: the peft config and the servability guard, checked before the model is
  even loaded, so a config the servers would refuse is refused here with every reason;
- :mod:`training.batching`: tokenised examples, length-bucketed batches and sequence packing;
  the batch order is a pure function of (seed, epoch);
- :mod:`training.losses`: cross-entropy on completion tokens and, with ``kd_ratio`` > 0, the
  top-k logit-distillation loss; gradient accumulation normalises by the completion tokens of
  the whole optimiser step;
- :mod:`training.checkpoint`: a checkpoint every ``save_every`` steps; a restarted run resumes
  from the latest and ends with the same adapter as an uninterrupted run.

AdamW, linear warm-up then cosine decay, gradient clipping at 1.0, everything seeded. Data
parallel under `torchrun` / `accelerate launch` (see ``training.distributed``): the ranks split
each micro-batch's rows and sum gradients, so N processes train the adapter one process would.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from peft import get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from serving import base_models, servability
from training import checkpoint, distributed
from training.batching import Example, collate, encode, indices_for_steps, micro_batch_stream
from training.config import LoraSettings, TrainSettings
from training.lora import lora_config, require_servable
from training.losses import completion_loss
from training.row import Row
from training.task import Task

Say = Callable[[str], None]


@dataclass(frozen=True)
class TrainResult:
    """What a finished training run produced."""

    adapter_dir: Path
    steps: int
    final_loss: float
    tokens_per_s: float
    seconds: float
    examples: int
    skipped_too_long: int


def train(
    rows: list[Row],
    task: Task,
    base_dir: Path,
    lora: LoraSettings,
    settings: TrainSettings,
    out_dir: Path,
    *,
    say: Say | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on ``rows`` into ``out_dir/adapter``, resuming from ``out_dir/checkpoints``.

    Under `torchrun` / `accelerate launch` every rank takes every world-th row of each micro-batch,
    so the global batch is the single-process one; only rank 0 writes files and prints progress.
    """
    say = (say or _stderr) if distributed.is_main() else _silent
    out_dir = Path(out_dir)

    # --- setup: refuse a non-servable shape before spending anything on it
    require_servable(lora, base_dir)
    if not rows:
        raise ValueError("the training split is empty: curation kept no rows (its dataset card, data/card.md, says which step dropped them)")
    base_name = servability.base_names(base_dir)[0]
    tokenizer = _tokenizer(str(base_dir))
    examples, too_long = encode(rows, task, tokenizer, settings.max_length, settings.kd_top_k if settings.kd_ratio else 0)
    if not examples:
        raise ValueError(f"no training rows fit train.max_length={settings.max_length}; raise it or check the data")
    if settings.kd_ratio:
        _report_kd_alignment(examples, say)
    lengths = [len(example.input_ids) for example in examples]
    batches_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * batches_per_epoch / settings.grad_accum))

    torch.manual_seed(settings.seed)
    dtype = getattr(torch, settings.dtype)
    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    # peft records the base's name_or_path in the adapter; servers match it against the base's name.
    base_model.name_or_path = base_name
    model = get_peft_model(base_model, lora_config(lora, base_name))
    model.train()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = round(settings.warmup_ratio * total_steps)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)

    fingerprint = checkpoint.fingerprint(lora, settings, examples)
    checkpoints = out_dir / "checkpoints"
    start_step, curve = checkpoint.resume(checkpoints, fingerprint, model, optimizer, scheduler, say)
    distributed.broadcast_(trainable)  # every rank starts from rank 0's weights
    say(f"training {len(examples)} rows ({too_long} too long) for {total_steps} steps "
        f"(batch {settings.batch_size} × accumulation {settings.grad_accum}, warm-up {warmup}) from step {start_step}"
        + (f" on {distributed.world_size()} processes" if distributed.world_size() > 1 else ""))

    # --- run
    micro_batches = micro_batch_stream(lengths, settings, start_step * settings.grad_accum)
    started = time.perf_counter()
    window_tokens, window_started = 0, time.perf_counter()
    # On a terminal a progress bar carries loss and tokens/s; otherwise (logs, CI) a line every log_every steps.
    bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="train", dynamic_ncols=True,
               disable=not (distributed.is_main() and sys.stderr.isatty()))
    for step in range(start_step, total_steps):
        if distributed.world_size() > 1:  # per-rank dropout masks, a function of (seed, step, rank): resume stays exact
            torch.manual_seed(_rank_seed(settings.seed, step, distributed.rank()))
        step_batches = [[examples[i] for i in next(micro_batches)] for _ in range(settings.grad_accum)]
        # The whole global step's completion tokens: every rank sees every micro-batch's rows.
        step_targets = sum(len(example.input_ids) - example.prompt_length for batch in step_batches for example in batch)
        step_batches = [share for share in map(distributed.shard, step_batches) if share]
        step_loss = 0.0
        for batch_examples in step_batches:
            batch = collate(batch_examples, tokenizer.pad_token_id, settings.max_length if settings.packing else None)
            loss_sum, _ = completion_loss(model, batch, settings.kd_ratio)
            (loss_sum / step_targets).backward()
            step_loss += loss_sum.item() / step_targets
            window_tokens += int(batch["attention_mask"].sum())
        if distributed.world_size() > 1:
            for parameter in trainable:
                if parameter.grad is None:  # a rank whose share of the step was empty
                    parameter.grad = torch.zeros_like(parameter)
            distributed.sum_([parameter.grad for parameter in trainable])
            step_loss = distributed.total(step_loss)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append({"step": step + 1, "loss": step_loss, "lr": scheduler.get_last_lr()[0]})
        bar.update(1)
        if (step + 1) % settings.log_every == 0 or step + 1 == total_steps:
            elapsed = time.perf_counter() - window_started
            window_tokens = distributed.total(window_tokens)
            if bar.disable:
                say(f"step {step + 1}/{total_steps}  loss {step_loss:.4f}  lr {curve[-1]['lr']:.2e}  {window_tokens / elapsed:.0f} tok/s")
            else:
                bar.set_postfix_str(f"loss {step_loss:.4f}  lr {curve[-1]['lr']:.2e}  {window_tokens / elapsed:.0f} tok/s")
            window_tokens, window_started = 0, time.perf_counter()
        if distributed.is_main() and ((step + 1) % settings.save_every == 0 or step + 1 == total_steps):
            checkpoint.save(checkpoints, step + 1, fingerprint, model, optimizer, scheduler, curve)
        if on_step is not None:
            on_step(step + 1)
    bar.close()
    seconds = time.perf_counter() - started

    # --- report: the adapter, its loss curve
    adapter_dir = out_dir / "adapter"
    if distributed.is_main():
        model.save_pretrained(adapter_dir, safe_serialization=True, save_embedding_layers=False)
        _write_curve(out_dir, curve)
    distributed.barrier()
    steps_run = total_steps - start_step
    processed = sum(len(examples[i].input_ids) for i in indices_for_steps(lengths, settings, start_step, total_steps))
    return TrainResult(
        adapter_dir=adapter_dir,
        steps=total_steps,
        final_loss=curve[-1]["loss"] if curve else float("nan"),
        tokens_per_s=processed / seconds if steps_run and seconds > 0 else 0.0,
        seconds=seconds,
        examples=len(examples),
        skipped_too_long=too_long,
    )


def _report_kd_alignment(examples: list[Example], say: Say) -> None:
    """Say how many completion positions have distillation targets; refuse when none do."""
    positions = sum(len(example.teacher_top) for example in examples)
    distilled = sum(1 for example in examples for top in example.teacher_top if top)
    if not distilled:
        raise ValueError(
            "train.kd_ratio > 0, but no teacher tokens line up with the student's completions: the teacher's "
            "tokenizer (or answer format) differs from the student's; set train.kd_ratio: 0 to distil from text alone"
        )
    say(f"logit distillation: teacher top-k at {distilled} of {positions} completion positions ({distilled / positions:.0%}); "
        "the rest (EOS, and tokens after the teacher's and student's ids part) get cross-entropy only")


def _write_curve(out_dir: Path, curve: list[dict]) -> None:
    """``loss.json`` and ``loss.csv``: one row per optimiser step."""
    (out_dir / "loss.json").write_text(json.dumps(curve) + "\n")
    lines = ["step,loss,lr"] + [f"{point['step']},{point['loss']:.6f},{point['lr']:.6e}" for point in curve]
    (out_dir / "loss.csv").write_text("\n".join(lines) + "\n")


@functools.lru_cache(maxsize=4)
def _tokenizer(base_dir: str):
    """The base's tokenizer, loaded once per process (building Gemma 3's 262k-entry BPE takes seconds)."""
    return base_models.load_tokenizer(Path(base_dir))


def _rank_seed(seed: int, step: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "little")


def _silent(message: str) -> None:
    pass


def _stderr(message: str) -> None:
    print(f"stillhouse: {message}", file=sys.stderr, flush=True)

