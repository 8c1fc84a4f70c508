"""LoRA supervised fine-tuning of the student prompt → teacher output (sequence-level distillation).

- The LoRA config is checked against the servability profile before the model is even loaded;
  a config the servers would refuse is refused here with every reason.
- Loss is cross-entropy on completion tokens only, and the LM head runs only at those positions:
  with Gemma 3's 262k vocabulary the head dominates the cost, and prompt positions need no logits.
- Length-bucketed batches (rows of similar length together) keep padding small; gradient
  accumulation normalises by the completion tokens of the whole optimiser step.
- AdamW, linear warm-up then cosine decay, gradient clipping at 1.0, everything seeded.
- A checkpoint (LoRA weights, optimiser, scheduler, RNG state, loss curve) every ``save_every``
  steps; a restarted run resumes from the latest one and ends with the same adapter as an
  uninterrupted run, because the batch order is a pure function of (seed, epoch).
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
from transformers import AutoModelForCausalLM

from serving import base_models, servability
from serving.servability import Violation
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


@dataclass(frozen=True)
class Example:
    """One tokenised row: prompt then completion ids; the loss covers ids from ``prompt_length`` on."""

    input_ids: list[int]
    prompt_length: int


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


def encode(rows: list[dict], task: Task, tokenizer, max_length: int) -> tuple[list[Example], int]:
    """Tokenise each row's student prompt and completion (+ EOS); returns (examples, rows too long)."""
    examples, too_long = [], 0
    for row in rows:
        prompt = tokenizer(task.student_prompt(row["inputs"])).input_ids
        completion = tokenizer(task.completion(row["output"]), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        if len(prompt) + len(completion) > max_length:
            too_long += 1
            continue
        examples.append(Example(prompt + completion, len(prompt)))
    return examples, too_long


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


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels masked to completion tokens."""
    width = max(len(example.input_ids) for example in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, example.prompt_length : length] = ids[row, example.prompt_length : length]
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def completion_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over completion tokens, with logits computed at those positions only."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][selected]).float()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets[selected], reduction="sum"), int(selected.sum())


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
    """Train a LoRA adapter on ``rows`` into ``out_dir/adapter``, resuming from ``out_dir/checkpoints``."""
    say = say or _stderr
    out_dir = Path(out_dir)

    # --- setup: refuse a non-servable shape before spending anything on it
    violations = check_servable(lora, base_dir)
    if violations:
        raise NotServableConfigError(lora.profile, violations)
    base_name = servability.base_names(base_dir)[0]
    tokenizer = _tokenizer(str(base_dir))
    examples, too_long = encode(rows, task, tokenizer, settings.max_length)
    if not examples:
        raise ValueError(f"no training rows fit train.max_length={settings.max_length}; raise it or check the data")
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
    say(f"training {len(examples)} rows ({too_long} too long) for {total_steps} steps "
        f"(batch {settings.batch_size} × accumulation {settings.grad_accum}, warm-up {warmup}) from step {start_step}")

    # --- run
    micro_batches = _micro_batch_stream(lengths, settings, start_step * settings.grad_accum)
    started = time.perf_counter()
    window_tokens, window_started = 0, time.perf_counter()
    for step in range(start_step, total_steps):
        step_batches = [[examples[i] for i in next(micro_batches)] for _ in range(settings.grad_accum)]
        step_targets = sum(len(example.input_ids) - example.prompt_length for batch in step_batches for example in batch)
        step_loss = 0.0
        for batch_examples in step_batches:
            batch = collate(batch_examples, tokenizer.pad_token_id)
            loss_sum, _ = completion_loss(model, batch)
            (loss_sum / step_targets).backward()
            step_loss += loss_sum.item() / step_targets
            window_tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append({"step": step + 1, "loss": step_loss, "lr": scheduler.get_last_lr()[0]})
        if (step + 1) % settings.log_every == 0 or step + 1 == total_steps:
            elapsed = time.perf_counter() - window_started
            say(f"step {step + 1}/{total_steps}  loss {step_loss:.4f}  lr {curve[-1]['lr']:.2e}  {window_tokens / elapsed:.0f} tok/s")
            window_tokens, window_started = 0, time.perf_counter()
        if (step + 1) % settings.save_every == 0 or step + 1 == total_steps:
            _save_checkpoint(checkpoints, step + 1, fingerprint, model, optimizer, scheduler, curve)
        if on_step is not None:
            on_step(step + 1)
    seconds = time.perf_counter() - started

    # --- report: the adapter, its loss curve
    adapter_dir = out_dir / "adapter"
    model.save_pretrained(adapter_dir, safe_serialization=True, save_embedding_layers=False)
    _write_curve(out_dir, curve)
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
    payload = json.dumps([lora.model_dump(), loop, [example.input_ids for example in examples]])
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


def _stderr(message: str) -> None:
    print(f"stillhouse: {message}", file=sys.stderr, flush=True)

