"""The segmented LoRA layer: every row gets exactly its own adapter, whatever the mix of the batch."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from serving.engines import lora_layers, packed_linear
from serving.engines.lora_layers import BatchedLoraLinear, LoraRows

IN, OUT, SLOTS, RANK = 24, 40, 6, 8
SCALING = [1.0, 2.0, 0.5, 4.0, 0.25, 3.0]


def adapters(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """One (A, B) per slot in peft's layout, ranks 8 and 4 mixed; slot 5 leaves the layer alone."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for slot in range(SLOTS - 1):
        rank = RANK if slot % 2 == 0 else RANK // 2
        pairs.append((torch.randn(rank, IN, generator=generator), torch.randn(OUT, rank, generator=generator)))
    return [*pairs, None]


def layer_with(base: nn.Module, rows: LoraRows) -> BatchedLoraLinear:
    layer = BatchedLoraLinear(base, rows)
    layer.resize(SLOTS, RANK)
    for slot, pair in enumerate(adapters()):
        layer.set_slot(slot, pair)
    return layer


def expected(base: nn.Linear, x: torch.Tensor, slots: list[int | None]) -> torch.Tensor:
    """Row by row, as peft computes one adapter: ``base(x) + scaling * B(A x)``."""
    pairs = adapters()
    out = base(x)
    for row, slot in enumerate(slots):
        if slot is not None and pairs[slot] is not None:
            a, b = pairs[slot]
            out[row] += (x[row] @ a.t()) @ b.t() * SCALING[slot]
    return out


MIXES = {
    "no adapter": [None, None, None],
    "one slot, every row": [2, 2, 2, 2],
    "one slot and base rows": [None, 3, None, 3],
    "distinct": [4, 0, 3, 1, 2],
    "uneven segments with a hole in the span": [4, 4, 4, 1, None, 4, 1],
    "an adapter that skips this layer": [5, 0, 5],
}


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("tokens", [1, 3])
def test_each_row_gets_its_own_adapter(mix, tokens):
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    rows = LoraRows(torch.device("cpu"))
    layer = layer_with(base, rows)
    slots = MIXES[mix]
    x = torch.randn(len(slots), tokens, IN)
    rows.bind(slots, SCALING)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected(base, x, slots), rtol=1e-5, atol=1e-5)


def test_random_mixes_match_the_row_by_row_reference():
    rng = random.Random(0)
    torch.manual_seed(1)
    base = nn.Linear(IN, OUT)
    rows = LoraRows(torch.device("cpu"))
    layer = layer_with(base, rows)
    for _ in range(50):
        slots = [rng.choice([None, *range(SLOTS)]) for _ in range(rng.randint(1, 9))]
        x = torch.randn(len(slots), 1, IN)
        rows.bind(slots, SCALING)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), expected(base, x, slots), rtol=1e-5, atol=1e-5, msg=str(slots))


def test_a_batch_without_adapters_is_the_base_layer_exactly():
    base = nn.Linear(IN, OUT)
    rows = LoraRows(torch.device("cpu"))
    layer = layer_with(base, rows)
    rows.bind([None, None], SCALING)
    x = torch.randn(2, 1, IN)
    with torch.inference_mode():
        assert torch.equal(layer(x), base(x))


@pytest.mark.skipif(not packed_linear.supported(torch.bfloat16, torch.device("cpu")), reason="no oneDNN prepacked linear")
def test_bf16_prepacked_base_adds_the_delta_inside_its_kernel():
    torch.manual_seed(2)
    base = nn.Linear(IN, OUT, bias=False)
    rows = LoraRows(torch.device("cpu"))
    reference = layer_with(base, rows)
    packed = layer_with(_bf16_copy(base), rows)
    packed.base = packed_linear.PackedLinear(packed.base)  # as the engine packs the model after installing
    slots = [4, None, 0, 0, 3]
    x = torch.randn(len(slots), 2, IN)
    rows.bind(slots, SCALING)
    with torch.inference_mode():
        want, got = reference(x), packed(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).abs().max() / want.abs().max()) < 0.01  # bfloat16's precision, not a wrong adapter


def _bf16_copy(linear: nn.Linear) -> nn.Linear:
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None).bfloat16()
    copy.load_state_dict({k: v.bfloat16() for k, v in linear.state_dict().items()})
    return copy


def test_install_wraps_only_the_lora_targets():
    model = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "lm_head": nn.Linear(4, 4), "mlp": nn.ModuleDict({"down_proj": nn.Linear(4, 4)})})
    layers = lora_layers.install(model, LoraRows(torch.device("cpu")))
    assert sorted(layers) == ["mlp.down_proj", "q_proj"]
    assert isinstance(model["lm_head"], nn.Linear)
