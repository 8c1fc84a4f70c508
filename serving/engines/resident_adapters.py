"""LoRA adapters attached to one base model through peft, least recently used evicted first.

peft injects every adapter into the same modules, and a forward picks adapters per batch
row with ``adapter_names`` ("__base__" for none), so no request ever depends on which
adapter is "active" and a base-model request cannot pick up an adapter by accident.
Which adapters stay is ``AdapterLRU``'s decision; this module carries it out on the model.
Every method except ``ids`` mutates the model and must run on the thread that runs forwards.
"""

from __future__ import annotations

import itertools
import logging
import time

from peft import PeftModel
from transformers import PreTrainedModel

from serving.engines.adapter_lru import AdapterLRU
from serving.engines.base import AdapterRef

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


class ResidentAdapters:
    """The base model plus up to ``capacity`` peft LoRA adapters, with reference counts.

    An adapter in use by a request is never evicted; if all resident adapters are in use,
    capacity is exceeded until one is released.
    """

    def __init__(self, base_model: PreTrainedModel, capacity: int):
        self._base = base_model
        self._peft: PeftModel | None = None  # created with the first adapter, dropped with the last
        self._lru = AdapterLRU(capacity)
        self._names: dict[str, str] = {}  # adapter id -> peft name
        self._name_counter = itertools.count()

    @property
    def ids(self) -> tuple[str, ...]:
        """Ids of the resident adapters, as an immutable snapshot any thread may read."""
        return self._lru.ids

    @property
    def model(self) -> PreTrainedModel | PeftModel:
        """The module to call for forwards."""
        return self._peft if self._peft is not None else self._base

    def forward_kwargs(self, adapter_ids: list[str | None]) -> dict:
        """Forward arguments applying ``adapter_ids[i]`` (None: the base) to batch row ``i``."""
        if self._peft is None:
            return {}
        return {"adapter_names": [self._names[a] if a is not None else BASE for a in adapter_ids]}

    def load(self, adapter: AdapterRef) -> float:
        """Make ``adapter`` resident (most recently used); returns the load time, 0 if it was resident."""
        if self._lru.touch(adapter.adapter_id):
            return 0.0
        self._drop(self._lru.make_room())
        # peft names key ModuleDicts, which reject dots: never use the adapter id itself
        name = f"adapter_{next(self._name_counter)}"
        start = time.perf_counter()
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self._base, adapter.path, adapter_name=name)
        else:
            self._peft.load_adapter(adapter.path, adapter_name=name)
        self._peft.eval()  # LoRA dropout must be off
        seconds = time.perf_counter() - start
        self._names[adapter.adapter_id] = name
        self._lru.add(adapter.adapter_id)
        log.info("loaded adapter %s in %.3f s", adapter.adapter_id, seconds)
        return seconds

    def acquire(self, adapter: AdapterRef) -> float:
        """Load ``adapter`` if needed and pin it for one request; returns the load time."""
        seconds = self.load(adapter)
        self._lru.pin(adapter.adapter_id)
        return seconds

    def release(self, adapter_id: str) -> None:
        """Unpin an adapter after a request; it becomes evictable when nobody uses it."""
        self._drop(self._lru.release(adapter_id))

    def unload(self, adapter_id: str) -> bool:
        """Drop an adapter now, or when its last request finishes; returns whether it was resident."""
        resident, dropped = self._lru.unload(adapter_id)
        self._drop(dropped)
        return resident

    def _drop(self, adapter_ids: list[str]) -> None:
        for adapter_id in adapter_ids:
            name = self._names.pop(adapter_id)
            if self._names:
                self._peft.delete_adapter(name)
            else:
                # peft cannot run with zero adapters: take the LoRA layers out and return to the base
                self._base = self._peft.unload()
                self._peft = None
