"""LoRA supervised fine-tuning of the student prompt → teacher output (sequence-level distillation).

- The LoRA config is checked against the servability profile before the model is even loaded;
  a config the servers would refuse is refused here with every reason.
- Loss is cross-entropy on completion tokens only, and the LM head runs only at those positions:
  with Gemma 3's 262k vocabulary the head dominates the cost, and prompt positions need no logits.
  With ``kd_ratio`` r > 0 (logit distillation) positions where the teacher's top-k is known train
  on (1 - r) * CE + r * KL(teacher || student) over that top-k (see ``top_k_kl``).
- Length-bucketed batches (rows of similar length together) keep padding small; with
  ``packing`` each micro-batch's examples share rows of up to ``max_length`` tokens instead, with
  attention kept inside each example (same loss, no padding). Gradient accumulation normalises
  by the completion tokens of the whole optimiser step.
- AdamW, linear warm-up then cosine decay, gradient clipping at 1.0, everything seeded.
- A checkpoint (LoRA weights, optimiser, scheduler, RNG state, loss curve) every ``save_every``
  steps; a restarted run resumes from the latest one and ends with the same adapter as an
  uninterrupted run, because the batch order is a pure function of (seed, epoch).
- Data parallel under `torchrun` / `accelerate launch` (see ``training.distributed``): the ranks split
  each micro-batch's rows and sum gradients, so N processes train the adapter one process would.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from serving import base_models, servability
from serving.servability import Violation
from training import distributed
from training.config import LoraSettings, TrainSettings
from training.task import Task

IGNORE = -100
_BUCKET_BATCHES = 50  # batches per sorting window: long enough to group lengths, short enough to stay shuffled

Say = Callable[[str], None]


class NotServableConfigError(ValueError):
    """The LoRA config would produce an adapter the servers refuse; ``violations`` says why."""

    def __init__(self, profile: str, violations: list[Violation]):
        lines = "\n  ".join(str(violation) for violation in violations)
        super().__init__(f"refusing to train: the LoRA config is not servable under the {profile} profile:\n  {lines}")
        self.violations = violations


#: one completion position's distillation target: the teacher's top-k token ids and log-probabilities
TeacherTop = tuple[tuple[int, ...], tuple[float, ...]]


@dataclass(frozen=True)
class Example:
    """One tokenised row: prompt then completion ids; the loss covers ids from ``prompt_length`` on.

    ``teacher_top`` (logit distillation only) holds one entry per completion id: the teacher's
    top-k at that position, or None where the position is trained with cross-entropy alone.
    """

    input_ids: list[int]
    prompt_length: int
    teacher_top: tuple[TeacherTop | None, ...] = ()


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


def lora_config(settings: LoraSettings, base_name: str) -> LoraConfig:
    """The peft LoraConfig for ``settings``, naming the served base."""
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.targets),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )


def check_servable(settings: LoraSettings, base_dir: Path) -> list[Violation]:
    """Every reason an adapter trained with ``settings`` would not be servable on ``base_dir``."""
    names = servability.base_names(base_dir)
    config = json.loads(json.dumps(lora_config(settings, names[0]).to_dict(), default=sorted))
    base_config = transformers.AutoConfig.from_pretrained(base_dir)
    return servability.check_lora_config(config, base_config, settings.profile, base_names=names)


def encode(rows: list[dict], task: Task, tokenizer, max_length: int, kd_top_k: int = 0) -> tuple[list[Example], int]:
    """Tokenise each row's student prompt and completion (+ EOS); returns (examples, rows too long).

    With ``kd_top_k`` > 0 each example also gets the teacher's top-``kd_top_k`` tokens from the
    row's ``teacher_tokens`` / ``teacher_top_logprobs``, at the completion positions where the
    teacher's generated ids equal the student's completion ids (their common prefix). Later
    positions, and the EOS the student is trained to end with, get cross-entropy only.
    """
    examples, too_long = [], 0
    vocab_size = len(tokenizer)
    for row in rows:
        prompt = tokenizer(task.student_prompt(row["inputs"])).input_ids
        answer = tokenizer(task.completion(row["output"]), add_special_tokens=False).input_ids
        completion = answer + [tokenizer.eos_token_id]
        if len(prompt) + len(completion) > max_length:
            too_long += 1
            continue
        teacher_top: tuple[TeacherTop | None, ...] = ()
        if kd_top_k:
            teacher_top = _teacher_targets(row, answer, kd_top_k, vocab_size) + (None,)
        examples.append(Example(prompt + completion, len(prompt), teacher_top))
    return examples, too_long


def _teacher_targets(row: dict, answer: list[int], k: int, vocab_size: int) -> tuple[TeacherTop | None, ...]:
    """The teacher's top-``k`` at each of ``answer``'s positions that its generated ids match."""
    tokens, tops = row.get("teacher_tokens"), row.get("teacher_top_logprobs")
    if tokens is None or tops is None:
        raise ValueError(
            f"row {row.get('id')!r} has no teacher_top_logprobs, which train.kd_ratio > 0 needs: label the rows "
            "with the teacher's top-k (`stillhouse label` with train.kd_ratio set, then `stillhouse data curate`), "
            "or set train.kd_ratio: 0"
        )
    out_of_range = [i for i in tokens if not 0 <= i < vocab_size] + [
        i for top in tops for i, _ in top if not 0 <= i < vocab_size
    ]
    if out_of_range:
        raise ValueError(
            f"row {row.get('id')!r}: the teacher's token ids (e.g. {out_of_range[0]}) are outside the student's "
            f"vocabulary of {vocab_size}: logit distillation needs a teacher with the student's tokenizer; "
            "set train.kd_ratio: 0 to distil from its text alone"
        )
    targets: list[TeacherTop | None] = [None] * len(answer)
    for position, (student_id, teacher_id, top) in enumerate(zip(answer, tokens, tops)):
        if student_id != teacher_id:
            break
        best = sorted(((int(i), float(v)) for i, v in top), key=lambda pair: -pair[1])[:k]
        if best:
            targets[position] = (tuple(i for i, _ in best), tuple(v for _, v in best))
    return tuple(targets)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of example indices for one epoch, a pure function of its arguments."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * _BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda index: lengths[index])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int, pack_width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels masked to completion tokens.

    Without ``pack_width`` every example has its own row. With it (sequence packing) the
    examples share rows of at most ``pack_width`` tokens, first fit by decreasing length; the
    batch then also carries ``position_ids`` restarting at each example and ``segments`` (the
    example's slot in its row, -1 on padding), from which :func:`packed_attention` keeps each
    token's attention inside its own example. Either way the loss sees the same tokens.

    With distillation targets, also ``kd_ids`` / ``kd_logprobs`` (``[rows, width, k]``, padded
    with id 0 and -inf) and ``kd_mask`` (``[rows, width]``), aligned with ``labels``.
    """
    rows = _pack(examples, pack_width) if pack_width else [[(example, 0)] for example in examples]
    width = max(offset + len(example.input_ids) for row in rows for example, offset in row)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for row, members in enumerate(rows):
        for slot, (example, offset) in enumerate(members):
            end = offset + len(example.input_ids)
            ids[row, offset:end] = torch.tensor(example.input_ids)
            labels[row, offset + example.prompt_length : end] = ids[row, offset + example.prompt_length : end]
            mask[row, offset:end] = 1
            positions[row, offset:end] = torch.arange(len(example.input_ids))
            segments[row, offset:end] = slot
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if pack_width:
        batch.update(position_ids=positions, segments=segments)
    k = max((len(top[0]) for example in examples for top in example.teacher_top if top), default=0)
    if k:
        kd_ids = torch.zeros((len(rows), width, k), dtype=torch.long)
        kd_logprobs = torch.full((len(rows), width, k), float("-inf"))
        kd_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for row, members in enumerate(rows):
            for example, offset in members:
                for index, top in enumerate(example.teacher_top):
                    if top:
                        position = offset + example.prompt_length + index
                        kd_ids[row, position, : len(top[0])] = torch.tensor(top[0])
                        kd_logprobs[row, position, : len(top[1])] = torch.tensor(top[1])
                        kd_mask[row, position] = True
        batch.update(kd_ids=kd_ids, kd_logprobs=kd_logprobs, kd_mask=kd_mask)
    return batch


def _pack(examples: list[Example], width: int) -> list[list[tuple[Example, int]]]:
    """Rows of (example, offset): each example, longest first, goes into the first row with room."""
    rows: list[list[tuple[Example, int]]] = []
    used: list[int] = []
    for example in sorted(examples, key=lambda example: -len(example.input_ids)):
        length = len(example.input_ids)
        row = next((index for index, taken in enumerate(used) if taken + length <= width), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append((example, used[row]))
        used[row] += length
    return rows


def packed_attention(segments: torch.Tensor, dtype: torch.dtype, sliding_window: int | None = None):
    """Additive ``[rows, 1, width, width]`` masks for packed rows: causal, within one example.

    Padding (segment -1) attends to padding only, so no softmax row is empty. When the model
    has local (sliding-window) layers narrower than the row, returns Gemma's mapping
    ``{"full_attention": ..., "sliding_attention": ...}`` with the window applied to the second.
    """
    width = segments.shape[1]
    index = torch.arange(width)
    allowed = (segments[:, :, None] == segments[:, None, :]) & (index[:, None] >= index[None, :])
    blocked = torch.finfo(dtype).min

    def additive(keep: torch.Tensor) -> torch.Tensor:
        return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, blocked)[:, None]

    if sliding_window is None or sliding_window >= width:
        return additive(allowed)
    local = allowed & (index[:, None] - index[None, :] < sliding_window)
    return {"full_attention": additive(allowed), "sliding_attention": additive(local)}


def top_k_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Forward KL(teacher ‖ student) per position, over the teacher's top-k tokens.

    ``student_logits`` is ``[n, vocab]``; ``teacher_ids`` / ``teacher_logprobs`` are ``[n, k]``
    (padding has logprob -inf). The teacher's probabilities are renormalised over its top-k, p;
    the student's are its full-vocabulary log-softmax gathered at those ids, log q. The term is
    ``sum_i p_i (log p_i - log q_i)``: the KL restricted to the teacher's support, without
    renormalising the student, so mass the student puts outside the teacher's top-k is pushed
    down too. It is >= 0, and 0 exactly when the student's distribution is the renormalised
    teacher's (all its mass on the teacher's top-k).
    """
    teacher_log = torch.log_softmax(teacher_logprobs.float(), dim=-1)
    teacher = teacher_log.exp()
    student_log = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_ids)
    terms = torch.where(teacher > 0, teacher * (teacher_log - student_log), torch.zeros_like(teacher))
    return terms.sum(dim=-1)


def completion_loss(model, batch: dict[str, torch.Tensor], kd_ratio: float = 0.0) -> tuple[torch.Tensor, int]:
    """Summed loss over completion tokens, with logits computed at those positions only.

    Cross-entropy against the completion ids; with ``kd_ratio`` r > 0, each position that has
    the teacher's top-k (``kd_mask``) is trained on ``(1 - r) * CE + r * top_k_kl`` instead, and
    the others on CE alone. The sum is normalised by the caller, per completion token.
    Returns (summed loss, completion tokens).
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "segments" in batch:  # packed rows: attention stays inside each example
        dtype = causal_lm.get_output_embeddings().weight.dtype
        window = getattr(causal_lm.config, "sliding_window", None)
        inputs.update(position_ids=batch["position_ids"], attention_mask=packed_attention(batch["segments"], dtype, window))
    hidden = causal_lm.get_decoder()(**inputs).last_hidden_state
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][selected]).float()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    count = int(selected.sum())
    if not kd_ratio or "kd_mask" not in batch:
        return F.cross_entropy(logits, targets[selected], reduction="sum"), count
    cross_entropy = F.cross_entropy(logits, targets[selected], reduction="none")
    distilled = batch["kd_mask"][:, 1:][selected]
    kl = top_k_kl(logits[distilled], batch["kd_ids"][:, 1:][selected][distilled], batch["kd_logprobs"][:, 1:][selected][distilled])
    loss = cross_entropy[~distilled].sum() + ((1 - kd_ratio) * cross_entropy[distilled] + kd_ratio * kl).sum()
    return loss, count


def train(
    rows: list[dict],
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
    violations = check_servable(lora, base_dir)
    if violations:
        raise NotServableConfigError(lora.profile, violations)
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

    fingerprint = _fingerprint(lora, settings, examples)
    checkpoints = out_dir / "checkpoints"
    start_step, curve = _resume(checkpoints, fingerprint, model, optimizer, scheduler, say)
    distributed.broadcast_(trainable)  # every rank starts from rank 0's weights
    say(f"training {len(examples)} rows ({too_long} too long) for {total_steps} steps "
        f"(batch {settings.batch_size} × accumulation {settings.grad_accum}, warm-up {warmup}) from step {start_step}"
        + (f" on {distributed.world_size()} processes" if distributed.world_size() > 1 else ""))

    # --- run
    micro_batches = _micro_batch_stream(lengths, settings, start_step * settings.grad_accum)
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
            _save_checkpoint(checkpoints, step + 1, fingerprint, model, optimizer, scheduler, curve)
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
    processed = sum(len(examples[i].input_ids) for i in _indices_for_steps(lengths, settings, start_step, total_steps))
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


# --- data order ------------------------------------------------------------------------------


def _micro_batch_stream(lengths: list[int], settings: TrainSettings, skip: int):
    """Micro-batches across epochs forever, skipping the first ``skip`` (already trained on)."""
    epoch, seen = 0, 0
    while True:
        for batch in epoch_batches(lengths, settings.batch_size, settings.seed, epoch):
            if seen >= skip:
                yield batch
            seen += 1
        epoch += 1


def _indices_for_steps(lengths: list[int], settings: TrainSettings, start: int, end: int) -> list[int]:
    stream = _micro_batch_stream(lengths, settings, start * settings.grad_accum)
    return [index for _ in range((end - start) * settings.grad_accum) for index in next(stream)]


# --- checkpoints -----------------------------------------------------------------------------


def _fingerprint(lora: LoraSettings, settings: TrainSettings, examples: list[Example]) -> str:
    """What must match for a checkpoint to be resumable: adapter shape, loop settings (bar logging), data."""
    loop = settings.model_dump(exclude={"save_every", "log_every"})
    data = [[example.input_ids, example.teacher_top] if example.teacher_top else example.input_ids for example in examples]
    payload = json.dumps([lora.model_dump(), loop, data])
    return hashlib.sha256(payload.encode()).hexdigest()


def _save_checkpoint(directory: Path, step: int, fingerprint: str, model, optimizer, scheduler, curve: list[dict]) -> None:
    """Write ``step-N.pt`` atomically, then drop older checkpoints (the newest one suffices)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "lora": get_peft_model_state_dict(model, save_embedding_layers=False),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "curve": curve,
    }
    temporary = directory / f".step-{step}.pt.tmp"
    torch.save(state, temporary)
    os.replace(temporary, directory / f"step-{step}.pt")
    for older in directory.glob("step-*.pt"):
        if older.name != f"step-{step}.pt":
            older.unlink()


def _resume(directory: Path, fingerprint: str, model, optimizer, scheduler, say: Say) -> tuple[int, list[dict]]:
    """Load the newest checkpoint into the model and optimiser; (0, []) when there is none."""
    found = sorted(directory.glob("step-*.pt"), key=lambda path: int(path.stem.split("-")[1]))
    if not found:
        return 0, []
    state = torch.load(found[-1], weights_only=False)
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"{found[-1]} was written by a run with other data or settings; "
            f"delete {directory} to start over, or train under another --name"
        )
    set_peft_model_state_dict(model, state["lora"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    say(f"resuming from {found[-1]} (step {state['step']})")
    return state["step"], list(state["curve"])


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

