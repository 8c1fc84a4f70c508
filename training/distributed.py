"""Data parallelism across the processes that `torchrun` or `accelerate launch` start.

Both launchers give every process ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
a process started without them is a world of one and every helper here is a no-op.
The group uses gloo for CPU tensors (and nccl for CUDA tensors when a GPU is present).

Gradients are combined by hand rather than with ``DistributedDataParallel``: each rank
back-propagates its share of the step's summed loss divided by the completion tokens of the whole
global step, and one all-reduce per optimiser step *sums* the LoRA gradients. The sum of those
partial gradients is the single-process gradient of the same global batch, so the ranks take the
very optimiser step one process would (up to float summation order). DDP would average after every
backward pass (a world-size rescale, and ``no_sync`` to keep accumulation from all-reducing each
micro-batch), and wrapping the peft model would rename the state-dict keys the checkpoints use.
"""

from __future__ import annotations

import atexit
import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

_TIMEOUT = timedelta(hours=2)  # the other ranks wait this long while rank 0 builds, labels and curates the data
_warned = False


def world_size() -> int:
    """Processes in the launched group (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files, registers adapters and prints progress."""
    return rank() == 0


def init() -> bool:
    """Join the launched process group once; False when this process runs alone."""
    global _warned
    if world_size() <= 1:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ and not _warned:
            _warned = True
            warnings.warn(
                "`accelerate launch --cpu` started a single process (accelerate starts several CPU processes only "
                "through mpirun); `accelerate launch --multi_gpu --num_processes N` starts N processes on CPU too",
                stacklevel=2,
            )
        return False
    if dist.is_initialized():
        return True
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size()} but {', '.join(missing)} unset: start data-parallel runs with "
            "`torchrun --nproc_per_node N -m stillhouse train ...` or `accelerate launch --multi_gpu --num_processes N -m stillhouse train ...`"
        )
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, rank=rank(), world_size=world_size(), timeout=_TIMEOUT)
    atexit.register(teardown)
    return True


def teardown() -> None:
    """Leave the process group (registered at exit by :func:`init`; safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here."""
    if init():
        dist.barrier()


def shard(items: list) -> list:
    """This rank's share of ``items``: every ``world_size()``-th one, starting at ``rank()``."""
    return items[rank() :: world_size()]


def sum_(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` across ranks in place, with one collective per dtype among them."""
    if not init():
        return
    for dtype in dict.fromkeys(tensor.dtype for tensor in tensors):  # same order on every rank
        group = [tensor for tensor in tensors if tensor.dtype == dtype]
        flat = torch.cat([tensor.reshape(-1) for tensor in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def total(value: float) -> float:
    """The sum of ``value`` over all ranks."""
    if not init():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.item()


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values."""
    if not init():
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)
