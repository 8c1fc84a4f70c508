"""Linear layers that apply a different LoRA adapter to each batch row (SGMV: segments by slot).

Every adapted projection keeps its adapters stacked slot by slot, laid out for batched
matmuls: ``A [slots, in, rank]`` and ``B [slots, rank, out]`` (each the transpose of peft's
matrix), ranks zero-padded to the largest loaded. Before a forward the engine binds each batch row
to a slot or to none (``LoraRows.bind``), which sorts the rows into segments, once for all layers:
the slots in use span ``lo .. hi``, and each slot of the span gets ``m`` positions, ``m`` the
most rows any slot has. Each layer then gathers its input rows into ``[hi - lo, m, in]`` (a
few kilobytes), multiplies them by the view ``A[lo:hi]``, scales that rank-sized product by each
position's adapter scaling, multiplies it by ``B[lo:hi]`` and gathers each row's result back.
No adapter weight is copied: the cost is the adapter weights in the span, read once, plus the
padding of uneven segments. A batch with one adapter is two plain matmuls; base-model rows get
nothing added, and a batch without adapters is the base layer alone. On a prepacked bfloat16
base (``packed_linear``) the delta is added inside the base layer's kernel. The stacks and the
LoRA product stay in float32 whatever the base dtype: on CPU float32 matmuls at these shapes are
faster than bfloat16 ones, and float32 greedy outputs stay equal to peft's.
"""

from __future__ import annotations

import torch
from torch import nn

from serving.engines.packed_linear import PackedLinear

#: the projections a LoRA adapter may target (the servability profiles' list)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: dtype of the adapter stacks and of the LoRA product
LORA_DTYPE = torch.float32


class LoraRows:
    """The segments of the next forward's rows by adapter slot, as every layer consumes them."""

    def __init__(self, device: torch.device):
        self._device = device
        self.span: tuple[int, int] | None = None  # slots lo .. hi (exclusive) in use; None: no row has an adapter
        self.per_slot = 0  # m: positions per slot of the span
        self.scaling = 0.0  # one segment of every row (``gather`` is None): its adapter's scaling
        self.gather: torch.Tensor | None = None  # [(hi - lo) * m]: the row at each position (padding: row 0)
        self.position_scaling: torch.Tensor | None = None  # [hi - lo, m, 1, 1]: the scaling at each position, 0 for padding
        self.back: torch.Tensor | None = None  # [rows]: each row's position
        self.adapted: torch.Tensor | None = None  # [rows, 1, 1]: 1 for rows with an adapter; None when every row has one

    def bind(self, slots: list[int | None], scaling: list[float]) -> None:
        """Row ``i`` uses slot ``slots[i]`` (None: the base model alone); ``scaling[s]`` is slot s's LoRA scaling."""
        used = [slot for slot in slots if slot is not None]
        self.gather = self.position_scaling = self.back = self.adapted = None
        if not used:
            self.span = None
            return
        lo, hi = min(used), max(used) + 1
        self.span = lo, hi
        if hi - lo == 1 and len(used) == len(slots):
            self.per_slot, self.scaling = len(slots), scaling[lo]
            return
        counts = [0] * (hi - lo)
        for slot in used:
            counts[slot - lo] += 1
        m = max(counts)
        gather, position_scaling, back = [0] * ((hi - lo) * m), [0.0] * ((hi - lo) * m), [0] * len(slots)
        filled = [0] * (hi - lo)
        for row, slot in enumerate(slots):
            if slot is not None:
                position = (slot - lo) * m + filled[slot - lo]
                filled[slot - lo] += 1
                gather[position], position_scaling[position], back[row] = row, scaling[slot], position
        self.per_slot = m
        self.gather = torch.tensor(gather, device=self._device)
        self.position_scaling = torch.tensor(position_scaling, dtype=LORA_DTYPE, device=self._device).view(hi - lo, m, 1, 1)
        self.back = torch.tensor(back, device=self._device)
        if len(used) < len(slots):
            adapted = [[[1.0 if slot is not None else 0.0]] for slot in slots]
            self.adapted = torch.tensor(adapted, dtype=LORA_DTYPE, device=self._device)


class BatchedLoraLinear(nn.Module):
    """``base(x)`` plus, for each row bound to a slot, that slot's ``scaling * B(A x)``."""

    def __init__(self, base: nn.Module, rows: LoraRows):
        super().__init__()
        self.base = base
        self.rows = rows
        self.in_features, self.out_features = base.in_features, base.out_features
        self.device = base.weight.device  # kept: ``base`` may be swapped for a prepacked layer without one
        self.lora_a: torch.Tensor | None = None  # [slots, in, rank]: A transposed
        self.lora_b: torch.Tensor | None = None  # [slots, rank, out]: B transposed

    def resize(self, slots: int, rank: int) -> None:
        """Make room for ``slots`` adapters of rank up to ``rank``, keeping what is loaded."""
        a = torch.zeros(slots, self.in_features, rank, dtype=LORA_DTYPE, device=self.device)
        b = torch.zeros(slots, rank, self.out_features, dtype=LORA_DTYPE, device=self.device)
        if self.lora_a is not None:
            old_slots, _, old_rank = self.lora_a.shape
            a[:old_slots, :, :old_rank] = self.lora_a
            b[:old_slots, :old_rank] = self.lora_b
        self.lora_a, self.lora_b = a, b

    def set_slot(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Copy an adapter's ``(A [rank, in], B [out, rank])`` into ``slot`` (None: this adapter leaves the layer alone)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if pair is not None:
            a, b = pair
            self.lora_a[slot, :, : a.shape[0]] = a.t()
            self.lora_b[slot, : b.shape[1]] = b.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if rows.span is None or self.lora_a is None:
            return self.base(x)
        delta = self.delta(x)
        if isinstance(self.base, PackedLinear):
            return self.base(x, plus=delta.to(x.dtype))
        return self.base(x) + delta.to(x.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA term of each row of ``x [rows, tokens, in]``, in ``LORA_DTYPE``."""
        rows = self.rows
        lo, hi = rows.span
        x = x.to(LORA_DTYPE)
        if rows.gather is None:  # one slot, every row: two plain matmuls
            return torch.matmul(torch.matmul(x, self.lora_a[lo]).mul_(rows.scaling), self.lora_b[lo])
        tokens, m = x.shape[1], rows.per_slot
        segments = x.index_select(0, rows.gather).view(hi - lo, m * tokens, self.in_features)
        hidden = torch.bmm(segments, self.lora_a[lo:hi]).view(hi - lo, m, tokens, -1).mul_(rows.position_scaling)
        products = torch.bmm(hidden.view(hi - lo, m * tokens, -1), self.lora_b[lo:hi])
        delta = products.view(-1, tokens, self.out_features).index_select(0, rows.back)
        return delta if rows.adapted is None else delta.mul_(rows.adapted)


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
