"""Inference engines behind one interface (``base.Engine``): the embedded ``torch`` engine, ``vllm``, and ``peft``.

``peft`` is a baseline for benchmarks: HF ``generate`` with peft's mixed-adapter batches.
"""

from typing import Literal, get_args

EngineName = Literal["torch", "vllm", "peft"]
ENGINES: tuple[str, ...] = get_args(EngineName)
