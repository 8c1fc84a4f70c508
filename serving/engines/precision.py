"""The compute dtype an engine runs in: bfloat16 where the CPU computes it natively, else float32.

``auto`` picks bfloat16 on a GPU that supports it and on CPUs with AVX512-BF16 or AMX (where
bf16 matmuls run at full speed), float32 elsewhere; an explicit name overrides it. float32 is
the parity path: the torch and vLLM engines agree token for token in it.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

log = logging.getLogger(__name__)

DtypeName = Literal["auto", "float32", "bfloat16"]
DTYPES: tuple[str, ...] = get_args(DtypeName)


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively."""
    import torch  # here: the CLI reads DTYPES without paying for torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(name: str, device: str = "cpu") -> str:
    """``float32`` or ``bfloat16`` for a ``--dtype`` value; logs what ``auto`` chose and why."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    if name != "auto":
        return name
    import torch

    chosen = "bfloat16" if native_bf16(device) else "float32"
    capability = torch.backends.cpu.get_cpu_capability() if not device.startswith("cuda") else device
    log.info("dtype auto: %s (%s, native bf16: %s)", chosen, capability, chosen == "bfloat16")
    return chosen
