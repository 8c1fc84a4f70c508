"""Training throughput: our trainer vs TRL's SFTTrainer (and a plain padded loop), side by side in one run.

Same base, LoRA config, rows, batch size and steps; CPU, float32; one untimed warm-up step each.

- TRL ``SFTTrainer``: prompt/completion rows with completion-only loss, no packing, no padding-free
  batching (random batches padded to the longest row), the model's full-vocabulary logits, the same
  LoRA config through ``peft_config``; logging, saving and evaluation off. Gradient checkpointing
  (on by default in TRL's ``SFTConfig``) is turned off, as in ours: recomputation is not what this
  compares. What remains of TRL's per-step work (its entropy / token-accuracy metrics) is kept.
- Plain padded loop: random batches of the same rows padded to the longest, ``model(**batch).loss.backward()``.
- Ours: length-bucketed batches and logits only at completion positions (``losses.completion_loss``);
  and ours packed: the random batches, each packed into rows of up to 256 tokens (``--packing on``).

Throughput is real (non-pad) tokens processed per wall-clock second for every column, and per CPU
second of the process, which other load on a shared machine disturbs less. TRL is an optional extra:

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/trainers.py [--base tiny|gemma-3-270m] [--steps 10] [--batch-size 8] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from serving import base_models
from training import batching, lora, losses
from training.config import LoraSettings
from training.row import Row
from training.task import load_task
from training.tasks.sentiment_data import generate

MAX_LENGTH = 256
LR = 1e-4


@dataclass(frozen=True)
class Rates:
    """Real (non-pad) tokens per wall-clock second and per CPU second of this process, and the padding share."""

    wall: float
    cpu: float
    padding: float

    @classmethod
    def of(cls, tokens: int, slots: int, start: tuple[float, float], end: tuple[float, float]) -> "Rates":
        return cls(tokens / (end[0] - start[0]), tokens / (end[1] - start[1]), 1 - tokens / slots)


def _clocks() -> tuple[float, float]:
    """(wall clock, this process's CPU time): on a shared machine the second is the steadier measure."""
    return time.perf_counter(), time.process_time()


def measure(model, batches, step) -> Rates:
    """Throughput over ``batches``, after one untimed warm-up batch."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    step(model, batches[0])
    optimizer.zero_grad(set_to_none=True)
    tokens, slots, started = 0, 0, _clocks()
    for batch in batches[1:]:
        step(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        slots += batch["attention_mask"].numel()
    return Rates.of(tokens, slots, started, _clocks())


def ours(model, batch) -> None:
    loss_sum, count = losses.completion_loss(model, batch)
    (loss_sum / count).backward()


def padded(model, batch) -> None:
    model(**batch).loss.backward()


def trl_sft(base_dir: Path, base_name: str, lora, tokenizer, records: list[dict], steps: int, batch_size: int) -> Rates:
    """Throughput of TRL's SFTTrainer over ``steps`` + 1 steps, the first untimed."""
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    class Clock(transformers.TrainerCallback):
        def __init__(self):
            self.step_ends: list[tuple[float, float]] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(_clocks())

    counts: list[tuple[int, int]] = []  # (real tokens, padded slots) per batch, in the order the steps use them

    def counting(collate):
        def wrapped(features):
            batch = collate(features)
            counts.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
            return batch

        return wrapped

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.name_or_path = base_name
    clock = Clock()
    with tempfile.TemporaryDirectory() as output_dir:
        config = SFTConfig(
            output_dir=output_dir,
            max_steps=steps + 1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1,
            learning_rate=LR,
            lr_scheduler_type="constant",
            max_length=MAX_LENGTH,
            packing=False,
            padding_free=False,
            completion_only_loss=True,
            gradient_checkpointing=False,
            bf16=False,
            fp16=False,
            use_cpu=True,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        sft = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                         processing_class=tokenizer, peft_config=lora, callbacks=[clock])  # fmt: skip
        sft.data_collator = counting(sft.data_collator)
        sft.remove_callback(transformers.PrinterCallback)  # its end-of-training summary line
        sft.train()
    timed = counts[1 : steps + 1]  # the dataloader may collate one batch ahead of the last step
    tokens, slots = sum(real for real, _ in timed), sum(total for _, total in timed)
    return Rates.of(tokens, slots, clock.step_ends[0], clock.step_ends[-1])


def _require_trl() -> None:
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("bench/trainers.py: the TRL column needs trl; install the extra: .venv/bin/pip install -e '.[bench]'")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); 1 is steadiest on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _require_trl()

    # --- setup: one row set; tokenised once for our loops, as prompt/completion text for TRL
    task = load_task("demo")
    base_dir = base_models.provision(args.base)
    tokenizer = base_models.load_tokenizer(base_dir)
    rows = [Row(id=r["id"], inputs={"review": r["review"]}, output=r["label"]) for r in generate("train", args.batch_size * (args.steps + 1) * 4)]
    examples, _ = batching.encode(rows, task, tokenizer, max_length=MAX_LENGTH)
    records = [{"prompt": task.student_prompt(row.inputs), "completion": task.completion(row.output)} for row in rows]
    lengths = [len(e.input_ids) for e in examples]
    bucketed = batching.epoch_batches(lengths, args.batch_size, seed=0, epoch=0)[: args.steps + 1]
    shuffled = list(range(len(examples)))
    random.Random(0).shuffle(shuffled)
    random_batches = [shuffled[i : i + args.batch_size] for i in range(0, len(shuffled), args.batch_size)][: args.steps + 1]

    def batches(order, pack_width=None):
        return [batching.collate([examples[i] for i in indices], tokenizer.pad_token_id, pack_width) for indices in order]

    base_name = base_models.base_identity(base_dir).name

    def lora():  # a fresh LoraConfig per model: peft fills some of its fields in
        return lora.lora_config(LoraSettings(), base_name)

    # --- run: a fresh LoRA model for each loop
    results = {"TRL SFTTrainer (padded, full logits)": trl_sft(base_dir, base_name, lora(), tokenizer, records, args.steps, args.batch_size)}
    loops = (
        ("plain padded loop (full logits)", padded, random_batches, None),
        ("stillhouse trainer", ours, bucketed, None),
        ("stillhouse trainer, packed", ours, random_batches, MAX_LENGTH),
    )
    for name, step, order, pack_width in loops:
        torch.manual_seed(0)
        causal_lm = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        causal_lm.name_or_path = base_name
        model = get_peft_model(causal_lm, lora())
        model.train()
        results[name] = measure(model, batches(order, pack_width), step)

    # --- report
    trl = results["TRL SFTTrainer (padded, full logits)"]
    print(f"base {args.base}, LoRA r=8 on 7 projections, batch {args.batch_size}, {args.steps} timed steps, "
          f"{torch.get_num_threads()} threads, float32; real (non-pad) tokens per wall-clock second and per CPU second")
    print(f"{'loop':38} {'tok/s':>8} {'vs TRL':>7} {'tok/CPU-s':>10} {'vs TRL':>7} {'padding':>8}")
    for name, rates in results.items():
        print(f"{name:38} {rates.wall:8.1f} {rates.wall / trl.wall:6.2f}x {rates.cpu:10.1f} {rates.cpu / trl.cpu:6.2f}x {rates.padding:8.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
