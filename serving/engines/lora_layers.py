"""Linear layers that apply a different LoRA adapter to each batch row (the BGMV idea).

Every adapted projection keeps its adapters stacked: ``A [slots, rank, in]``, ``B [slots, out,
rank]``, one scaling per slot, ranks zero-padded to the largest loaded. Before a forward the
engine binds each batch row to a slot or to none (``LoraRows``); the layer then gathers the
rows' matrices and adds ``scaling * B(A x)`` with two batched matmuls, only for the rows that
have an adapter: base-model rows cost nothing extra, and one forward serves any mix. The
stacks and the LoRA product stay in float32 whatever the base dtype: on CPU a bfloat16 ``bmm`` at
LoRA shapes (rank 8) is two orders of magnitude slower than a float32 one.
"""

from __future__ import annotations

import torch
from torch import nn

#: the projections a LoRA adapter may target (the servability profiles' list)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: dtype of the adapter stacks and of the LoRA product
LORA_DTYPE = torch.float32


class LoraRows:
    """Which rows of the next forward carry an adapter, and the slot of each."""

    def __init__(self, device: torch.device):
        self._device = device
        self.index: torch.Tensor | None = None  # batch rows with an adapter; None: no row has one
        self.slots: torch.Tensor | None = None
        self.every_row = False

    def bind(self, slots: list[int | None]) -> None:
        """Row ``i`` uses slot ``slots[i]`` (None: the base model alone)."""
        rows = [i for i, slot in enumerate(slots) if slot is not None]
        if not rows:
            self.index = self.slots = None
            return
        self.index = torch.tensor(rows, device=self._device)
        self.slots = torch.tensor([slots[i] for i in rows], device=self._device)
        self.every_row = len(rows) == len(slots)


class BatchedLoraLinear(nn.Module):
    """``base(x)`` plus, per row bound to a slot, that slot's ``scaling * B(A x)``."""

    def __init__(self, base: nn.Linear, rows: LoraRows):
        super().__init__()
        self.base = base
        self.rows = rows
        self.in_features, self.out_features = base.in_features, base.out_features
        self.device = base.weight.device  # kept: ``base`` may be swapped for a prepacked layer without one
        self.lora_a: torch.Tensor | None = None  # [slots, rank, in]
        self.lora_b: torch.Tensor | None = None  # [slots, out, rank]
        self.scaling: torch.Tensor | None = None  # [slots]

    def resize(self, slots: int, rank: int) -> None:
        """Make room for ``slots`` adapters of rank up to ``rank``, keeping what is loaded."""
        a = torch.zeros(slots, rank, self.in_features, dtype=LORA_DTYPE, device=self.device)
        b = torch.zeros(slots, self.out_features, rank, dtype=LORA_DTYPE, device=self.device)
        scaling = torch.zeros(slots, dtype=LORA_DTYPE, device=self.device)
        if self.lora_a is not None:
            old_slots, old_rank = self.lora_a.shape[:2]
            a[:old_slots, :old_rank] = self.lora_a
            b[:old_slots, :, :old_rank] = self.lora_b
            scaling[:old_slots] = self.scaling
        self.lora_a, self.lora_b, self.scaling = a, b, scaling

    def set_slot(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None, scaling: float) -> None:
        """Copy an adapter's ``(A, B)`` into ``slot`` (None: this adapter leaves the layer alone)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.scaling[slot] = 0.0
        if pair is not None:
            a, b = pair
            self.lora_a[slot, : a.shape[0]] = a
            self.lora_b[slot, :, : b.shape[1]] = b
            self.scaling[slot] = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows = self.rows
        if rows.index is None or self.lora_a is None:
            return out
        xs = (x if rows.every_row else x.index_select(0, rows.index)).to(LORA_DTYPE)
        hidden = torch.bmm(xs, self.lora_a.index_select(0, rows.slots).transpose(1, 2))
        delta = torch.bmm(hidden, self.lora_b.index_select(0, rows.slots).transpose(1, 2))
        delta = (delta * self.scaling.index_select(0, rows.slots).view(-1, 1, 1)).to(out.dtype)
        return out + delta if rows.every_row else out.index_add(0, rows.index, delta)


def install(model: nn.Module, rows: LoraRows) -> dict[str, BatchedLoraLinear]:
    """Wrap every LoRA-targetable linear layer of ``model``; returns them by their module name."""
    layers = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and isinstance(child, nn.Linear):
                layer = BatchedLoraLinear(child, rows)
                setattr(module, child_name, layer)
                layers[f"{name}.{child_name}" if name else child_name] = layer
    return layers
