"""Training throughput: our trainer's step vs a plain padded baseline, side by side in one run.

Same base, LoRA config, rows, batch size and steps. The baseline is what a plain loop (or TRL's
SFTTrainer without packing) does: random batches padded to the longest row, and the model's own
forward with ``labels``, which computes logits at every position. Ours: length-bucketed batches
and logits only at completion positions. TRL itself needs transformers 5, which lorax-client's
huggingface-hub pin keeps out of this environment, so the baseline is written out here.

    .venv/bin/python bench/training.py [--base tiny|gemma-3-270m] [--steps 10] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import base_models  # noqa: E402
from training import trainer  # noqa: E402
from training.config import LoraSettings  # noqa: E402
from training.task import load_task  # noqa: E402
from training.tasks.sentiment_data import generate  # noqa: E402


def measure(model, batches, step) -> float:
    """Real (non-pad) tokens per second over ``batches``, after one untimed warm-up batch."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step(model, batches[0])
    optimizer.zero_grad(set_to_none=True)
    tokens, started = 0, time.perf_counter()
    for batch in batches[1:]:
        step(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - started)


def ours(model, batch) -> None:
    loss_sum, count = trainer.completion_loss(model, batch)
    (loss_sum / count).backward()


def baseline(model, batch) -> None:
    model(**batch).loss.backward()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    # --- setup: one tokenised row set, two batch orders
    task = load_task("demo")
    base_dir = base_models.provision(args.base)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = [{"inputs": {"review": r["review"]}, "output": r["label"]} for r in generate("train", args.batch_size * (args.steps + 1) * 4)]
    examples, _ = trainer.encode(rows, task, tokenizer, max_length=256)
    lengths = [len(e.input_ids) for e in examples]
    bucketed = trainer.epoch_batches(lengths, args.batch_size, seed=0, epoch=0)[: args.steps + 1]
    shuffled = list(range(len(examples)))
    random.Random(0).shuffle(shuffled)
    padded = [shuffled[i : i + args.batch_size] for i in range(0, len(shuffled), args.batch_size)][: args.steps + 1]

    def batches(order):
        return [trainer.collate([examples[i] for i in indices], tokenizer.pad_token_id) for indices in order]

    base_name = base_models.base_identity(base_dir).name
    lora = trainer.lora_config(LoraSettings(), base_name)

    # --- run: the same LoRA model for both loops, fresh each time
    results = {}
    for name, step, order in (("baseline (padded, full logits)", baseline, padded), ("stillhouse trainer", ours, bucketed)):
        torch.manual_seed(0)
        causal_lm = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        causal_lm.name_or_path = base_name
        model = get_peft_model(causal_lm, lora)
        model.train()
        results[name] = measure(model, batches(order), step)

    # --- report
    base_rate = results["baseline (padded, full logits)"]
    print(f"base {args.base}, LoRA r=8 on 7 projections, batch {args.batch_size}, {args.steps} timed steps, "
          f"{torch.get_num_threads()} threads, float32")
    print(f"{'loop':34} {'real tok/s':>10} {'ratio':>6}")
    for name, rate in results.items():
        print(f"{name:34} {rate:10.1f} {rate / base_rate:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
