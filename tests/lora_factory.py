"""Build peft LoRA adapters with non-zero weights for tests, the way users' tools write them."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 8,
    alpha: int = 16,
    targets: tuple[str, ...] = ALL_PROJECTIONS,
    seed: int = 0,
    scale: float = 0.05,
    **config_overrides,
) -> Path:
    """Save a peft adapter for ``base_dir`` in ``out_dir`` whose B matrices are random, not zero.

    ``config_overrides`` go straight to ``LoraConfig`` (e.g. ``use_dora=True``), so tests can
    produce exactly the adapters servers refuse.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), task_type="CAUSAL_LM", **config_overrides
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)
