"""Prepacked bfloat16 linear layers: bit-identical to plain ones, so a bfloat16 engine keeps transformers' outputs."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from serving.engines import packed_linear
from serving.engines.packed_linear import PackedLinear
from serving.engines.torch_engine import TorchEngine
from tests.serving.engines.test_torch_engine import GREEDY, NEW_TOKENS, PROMPTS, generate, reference_greedy

CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(
    not packed_linear.supported(torch.bfloat16, CPU), reason="this torch build has no oneDNN prepacked linear"
)


def test_only_bfloat16_on_cpu_is_packed():
    assert not packed_linear.supported(torch.float32, CPU)
    assert not packed_linear.supported(torch.bfloat16, torch.device("meta"))


def test_packed_model_gives_bit_identical_logits(tiny_base_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.bfloat16).eval()
    packed = copy.deepcopy(model)
    linear_layers = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert packed_linear.pack(packed) == linear_layers
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    ids = torch.randint(3, 1000, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for rows in (ids, ids[:1], ids[:, :1]):  # prefill batch, one prompt, one decode row each
            assert torch.equal(packed(rows).logits, model(rows).logits)


def test_bfloat16_engine_packs_and_matches_transformers_generate(tiny_base_dir):
    engine = TorchEngine(tiny_base_dir, "tiny", dtype=torch.bfloat16)
    asyncio.run(engine.start())
    try:
        assert isinstance(engine._adapters.model.lm_head, PackedLinear)
        outputs = {prompt: [t.id for t in generate(engine, prompt, GREEDY)[0]] for prompt in PROMPTS}
    finally:
        asyncio.run(engine.stop())
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.bfloat16).eval()
    for prompt, ids in outputs.items():
        assert ids == reference_greedy(model, engine.tokenize(prompt), NEW_TOKENS), prompt
