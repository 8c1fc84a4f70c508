"""The adapter's shape: the peft ``LoraConfig`` a run trains, and the servability guard on it.

Every command that trains (``train``, ``ablate``, ``sweep``) calls :func:`require_servable`
before it builds data or loads a model, so an adapter the servers would refuse is refused here
with every reason, and never written.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from peft import LoraConfig

from serving import servability
from serving.servability import Violation
from training.config import LoraSettings


class NotServableConfigError(ValueError):
    """The LoRA config would produce an adapter the servers refuse; ``violations`` says why."""

    def __init__(self, profile: str, violations: list[Violation]):
        lines = "\n  ".join(str(violation) for violation in violations)
        super().__init__(f"refusing to train: the LoRA config is not servable under the {profile} profile:\n  {lines}")
        self.profile = profile
        self.violations = violations


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


def require_servable(settings: LoraSettings, base_dir: Path) -> None:
    """Raise :class:`NotServableConfigError` with every reason when ``settings`` is not servable on ``base_dir``."""
    violations = check_servable(settings, base_dir)
    if violations:
        raise NotServableConfigError(settings.profile, violations)
