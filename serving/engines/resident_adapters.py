"""LoRA adapters in two tiers: CPU memory (read from disk) and batch slots (applied in forwards).

A request's adapter is read from disk (peft parses and checks it) into the CPU tier, a
thread-safe LRU of up to ``cpu_capacity`` adapters, on any thread; copying it into one of the
batched LoRA layers' slots is the only step that touches the model. Which adapters keep a slot
is ``AdapterLRU``'s decision (least recently used first, never one a request pins); when every
slot is pinned the slot stacks grow. Every method except ``ids``, ``read`` and ``in`` mutates
the model and must run on the thread that runs forwards.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from transformers import PreTrainedModel

from serving.engines import lora_layers
from serving.engines.adapter_lru import AdapterLRU
from serving.engines.adapter_weights import AdapterWeights, read_adapter
from serving.engines.base import AdapterRef

log = logging.getLogger(__name__)


class CpuAdapters:
    """Adapters read from disk, kept in CPU memory, least recently used dropped first (any thread)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._weights: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, adapter: AdapterRef) -> AdapterWeights:
        """The adapter's weights: from memory, else read from disk (and kept)."""
        with self._lock:
            if adapter.adapter_id in self._weights:
                self._weights.move_to_end(adapter.adapter_id)
                return self._weights[adapter.adapter_id]
        weights = read_adapter(adapter.path)
        with self._lock:
            self._weights[adapter.adapter_id] = weights
            while len(self._weights) > self.capacity:
                self._weights.popitem(last=False)
        return weights

    def forget(self, adapter_id: str) -> None:
        with self._lock:
            self._weights.pop(adapter_id, None)


class ResidentAdapters:
    """The base model with batched LoRA layers and up to ``capacity`` adapters in slots, with reference counts.

    An adapter in use by a request is never evicted; if all resident adapters are in use,
    capacity is exceeded until one is released.
    """

    def __init__(self, base_model: PreTrainedModel, capacity: int, cpu_capacity: int = 64):
        self.model = base_model
        self._rows = lora_layers.LoraRows(base_model.device)
        self._layers = lora_layers.install(base_model, self._rows)
        self._lru = AdapterLRU(capacity)
        self._cpu = CpuAdapters(max(cpu_capacity, 1))
        self._slot_of: dict[str, int] = {}
        self._scaling: list[float] = []  # per slot
        self._free: list[int] = []
        self._slots = 0
        self._rank = 0

    @property
    def ids(self) -> tuple[str, ...]:
        """Ids of the resident adapters, as an immutable snapshot any thread may read."""
        return self._lru.ids

    def __contains__(self, adapter_id: object) -> bool:
        """Whether the adapter holds a slot (even one waiting to be unloaded)."""
        return adapter_id in self._lru

    def read(self, adapter: AdapterRef) -> AdapterWeights:
        """The adapter's weights from the CPU tier or the disk; safe on any thread, never touches the model."""
        return self._cpu.get(adapter)

    def bind(self, adapter_ids: list[str | None]) -> None:
        """Apply ``adapter_ids[i]`` (None: the base model) to batch row ``i`` of the next forward."""
        self._rows.bind([self._slot_of[a] if a is not None else None for a in adapter_ids], self._scaling)

    def load(self, adapter: AdapterRef, weights: AdapterWeights | None = None) -> float:
        """Give ``adapter`` a slot (most recently used); returns the load time, 0 if it had one.

        ``weights`` read beforehand (off this thread) skip the read here.
        """
        if self._lru.touch(adapter.adapter_id):
            return 0.0
        started = time.perf_counter()
        weights = weights or self.read(adapter)
        self._check_targets(adapter, weights)
        self._drop(self._lru.make_room())
        slot = self._take_slot(weights.rank)
        for name, layer in self._layers.items():
            layer.set_slot(slot, weights.modules.get(name))
        self._scaling[slot] = weights.scaling
        self._slot_of[adapter.adapter_id] = slot
        self._lru.add(adapter.adapter_id)
        seconds = time.perf_counter() - started
        log.info("loaded adapter %s into slot %d in %.3f s", adapter.adapter_id, slot, seconds)
        return seconds

    def acquire(self, adapter: AdapterRef, weights: AdapterWeights | None = None) -> float:
        """Load ``adapter`` if needed and pin it for one request; returns the load time."""
        seconds = self.load(adapter, weights)
        self._lru.pin(adapter.adapter_id)
        return seconds

    def release(self, adapter_id: str) -> None:
        """Unpin an adapter after a request; it becomes evictable when nobody uses it."""
        self._drop(self._lru.release(adapter_id))

    def unload(self, adapter_id: str) -> bool:
        """Drop an adapter now, or when its last request finishes; returns whether it was resident."""
        resident, dropped = self._lru.unload(adapter_id)
        self._drop(dropped)
        self._cpu.forget(adapter_id)
        return resident

    def _check_targets(self, adapter: AdapterRef, weights: AdapterWeights) -> None:
        unknown = sorted(set(weights.modules) - set(self._layers))
        if unknown:
            raise ValueError(
                f"adapter {adapter.adapter_id} targets modules this engine cannot adapt: {unknown[:3]} "
                f"(LoRA targets must be among {', '.join(lora_layers.TARGETS)})"
            )

    def _take_slot(self, rank: int) -> int:
        if not self._free or rank > self._rank:
            slots = self._slots if self._free else max(self._slots * 2, self._lru.capacity, 1)
            self._rank = max(self._rank, rank)
            for layer in self._layers.values():
                layer.resize(slots, self._rank)
            self._free.extend(range(self._slots, slots))
            self._scaling.extend([0.0] * (slots - self._slots))
            self._slots = slots
        slot = min(self._free)  # the lowest: the slots in use stay one short span
        self._free.remove(slot)
        return slot

    def _drop(self, adapter_ids: list[str]) -> None:
        for adapter_id in adapter_ids:
            self._free.append(self._slot_of.pop(adapter_id))
