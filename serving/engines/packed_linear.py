"""Linear layers whose bfloat16 weights are reordered once into oneDNN's blocked layout (CPU).

A plain bfloat16 ``nn.Linear`` on CPU hands oneDNN a row-major weight that its AMX / AVX512-BF16
matmul re-blocks on every call; at decode shapes (a few rows against a large weight) that copy
is a large share of the forward, the LM head's 262k-row weight above all. Reordering each weight
once when the model loads runs the same kernel on the same numbers, so outputs stay bit-identical
(``pack`` checks that before it swaps anything). float32, the parity path, keeps plain layers.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

#: rows per call oneDNN tunes the blocked layout for (a full decode batch); any row count works
BATCH_HINT = 16


def supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``pack`` applies: bfloat16 on a CPU whose torch has oneDNN's prepacked linear."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (
        dtype == torch.bfloat16
        and device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """``nn.Linear``'s forward on a weight held in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.device = linear.weight.device
        with torch.inference_mode():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor, plus: torch.Tensor | None = None) -> torch.Tensor:
        """``x Wᵀ + b``, and ``+ plus`` (the output's shape and dtype) added inside the kernel before it rounds."""
        flat = x.reshape(-1, self.in_features)
        if plus is None:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        else:
            out = torch.ops.mkldnn._linear_pointwise.binary(flat, plus.reshape(-1, self.out_features), self.packed, self.bias, "add")
        return out.reshape(*x.shape[:-1], self.out_features)


def pack(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` by a ``PackedLinear``; returns how many were replaced.

    Replaces none when a packed layer does not reproduce its plain one exactly on a probe input.
    """
    targets = [
        (module, name, child)
        for module in model.modules()
        for name, child in module.named_children()
        if isinstance(child, nn.Linear)
    ]
    if not targets or not _reproduces(targets[0][2]):
        log.warning("prepacked bfloat16 linear layers differ from plain ones here; keeping plain layers")
        return 0
    for module, name, child in targets:
        setattr(module, name, PackedLinear(child))
    return len(targets)


def _reproduces(linear: nn.Linear) -> bool:
    probe = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
    probe = probe.to(linear.weight.dtype).to(linear.weight.device)
    with torch.inference_mode():
        return torch.equal(PackedLinear(linear)(probe), linear(probe))
