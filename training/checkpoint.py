"""Checkpoints: save and resume a training run exactly.

A checkpoint holds the LoRA weights, optimiser, scheduler, RNG state and loss curve; only the
newest is kept. A run resumes only from a checkpoint with its own fingerprint (adapter shape,
loop settings, data), so a restarted run ends with the adapter an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from training.batching import Example
from training.config import LoraSettings, TrainSettings


def fingerprint(lora: LoraSettings, settings: TrainSettings, examples: list[Example]) -> str:
    """What must match for a checkpoint to be resumable: adapter shape, loop settings (bar logging), data."""
    loop = settings.model_dump(exclude={"save_every", "log_every"})
    data = [[example.input_ids, example.teacher_top] if example.teacher_top else example.input_ids for example in examples]
    payload = json.dumps([lora.model_dump(), loop, data])
    return hashlib.sha256(payload.encode()).hexdigest()


def save(directory: Path, step: int, run_fingerprint: str, model, optimizer, scheduler, curve: list[dict]) -> None:
    """Write ``step-N.pt`` atomically, then drop older checkpoints (the newest one suffices)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "fingerprint": run_fingerprint,
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


def resume(directory: Path, run_fingerprint: str, model, optimizer, scheduler, say: Callable[[str], None]) -> tuple[int, list[dict]]:
    """Load the newest checkpoint into the model and optimiser; (0, []) when there is none."""
    found = sorted(directory.glob("step-*.pt"), key=lambda path: int(path.stem.split("-")[1]))
    if not found:
        return 0, []
    state = torch.load(found[-1], weights_only=False)
    if state["fingerprint"] != run_fingerprint:
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

