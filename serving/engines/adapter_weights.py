"""A peft LoRA adapter read from disk into plain CPU tensors, ready to copy into a batch slot.

peft parses and checks the ``adapter_config.json`` and reads the weights file; what comes out
is one ``(A, B)`` pair per target module, named as in the base model, plus the scaling peft
would apply. Only plain LoRA is accepted (what the servability profiles allow): DoRA, biases,
``modules_to_save`` and per-module rank or alpha patterns are refused with the reason.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import load_peft_weights

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter's LoRA matrices on the CPU: ``modules[name] = (A [r, in], B [out, r])``."""

    rank: int
    scaling: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    read_seconds: float

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def read_adapter(path: Path) -> AdapterWeights:
    """Read and check the peft LoRA adapter in ``path``; raises ``ValueError`` naming what cannot be served."""
    started = time.perf_counter()
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{path} holds no adapter_config.json: point the registry entry at a peft LoRA directory")
    config = LoraConfig.from_pretrained(str(path))
    problems = [
        reason
        for reason, present in [
            ("uses DoRA (use_dora)", config.use_dora),
            (f"trains biases (bias={config.bias!r})", config.bias != "none"),
            ("saves whole modules (modules_to_save)", bool(config.modules_to_save)),
            ("sets per-module ranks or alphas (rank_pattern/alpha_pattern)", bool(config.rank_pattern or config.alpha_pattern)),
        ]
        if present
    ]
    if problems:
        raise ValueError(f"adapter {path} cannot be served: it {'; '.join(problems)}")
    state = load_peft_weights(str(path), device="cpu")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not key.startswith(_PREFIX) or not key.endswith(".weight") or ".lora_" not in key:
            raise ValueError(f"adapter {path} has a tensor {key!r} that is not a LoRA A or B matrix")
        module, kind = key[len(_PREFIX) : -len(".weight")].rsplit(".", 1)
        pairs.setdefault(module, {})[kind] = tensor
    modules = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter {path} has an incomplete LoRA pair for {module} ({sorted(pair)})")
        modules[module] = (pair["lora_A"], pair["lora_B"])
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    return AdapterWeights(rank=config.r, scaling=scaling, modules=modules, read_seconds=time.perf_counter() - started)
