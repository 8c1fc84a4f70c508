"""Shared fixtures: the tiny seeded base model, its adapters, and a scratch registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

from serving import base_models

# Property tests draw the same examples on every run: CI must not pass or fail by luck.
settings.register_profile("stillhouse", derandomize=True, deadline=None, database=None)
settings.load_profile("stillhouse")


@pytest.fixture(scope="session")
def tiny_base_dir() -> Path:
    """HF checkpoint directory of the deterministic tiny Gemma 3 base (real tokenizer)."""
    return base_models.provision("tiny", progress=False)


@pytest.fixture(scope="session")
def real_base_dir() -> Path:
    """HF checkpoint directory of gemma-3-270m (converted once from the GGUF package, then cached)."""
    return base_models.provision("gemma-3-270m", progress=False)
