"""Which LoRA adapters an engine holds, least recently used first, and which requests pin them.

Bookkeeping only: the engine loads and drops adapters itself (slots of batched LoRA layers in-process, HTTP
calls to vLLM), and every method that frees room returns the ids the engine must drop now.
An adapter a request uses is never evicted: when all resident adapters are in use, the engine
goes over capacity until one is released. An unload asked for while requests use an adapter
takes it out of ``ids`` at once and drops it when the last of them releases it.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict

log = logging.getLogger(__name__)


class AdapterLRU:
    """Up to ``capacity`` resident adapter ids, with reference counts and deferred unloads."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._order: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._users: Counter[str] = Counter()
        self._unload_when_idle: set[str] = set()
        #: ids of the resident adapters not waiting to be unloaded, as an immutable snapshot any thread may read
        self.ids: tuple[str, ...] = ()

    def __contains__(self, adapter_id: object) -> bool:
        """Whether the adapter is resident (even if it waits to be unloaded)."""
        return adapter_id in self._order

    def touch(self, adapter_id: str) -> bool:
        """Mark a resident adapter most recently used, cancelling a pending unload; False if it is not resident."""
        if adapter_id not in self._order:
            return False
        self._unload_when_idle.discard(adapter_id)
        self._order.move_to_end(adapter_id)
        self._publish()
        return True

    def make_room(self) -> list[str]:
        """Forget idle adapters, least recently used first, until one more fits; returns them, to drop."""
        return self._evict(room_for=1)

    def add(self, adapter_id: str) -> None:
        """Record a newly loaded adapter as the most recently used."""
        self._order[adapter_id] = None
        self._publish()

    def pin(self, adapter_id: str) -> None:
        """Count one more request using a resident adapter: it is not evicted until released."""
        self._users[adapter_id] += 1

    def release(self, adapter_id: str) -> list[str]:
        """Count one request fewer; returns the adapters to drop now (a pending unload, or room over capacity)."""
        self._users[adapter_id] -= 1
        if self._users[adapter_id] > 0:
            return []
        del self._users[adapter_id]
        dropped = []
        if adapter_id in self._unload_when_idle:
            self._forget(adapter_id)
            dropped.append(adapter_id)
        return dropped + self._evict(room_for=0)

    def unload(self, adapter_id: str) -> tuple[bool, list[str]]:
        """Ask for an adapter to go; returns whether it was resident, and what to drop now.

        An adapter in use is dropped when its last request releases it, so the list is empty then.
        """
        if adapter_id not in self._order or adapter_id in self._unload_when_idle:
            return False, []
        if self._users[adapter_id]:
            self._unload_when_idle.add(adapter_id)
            self._publish()
            return True, []
        self._forget(adapter_id)
        return True, [adapter_id]

    def _evict(self, room_for: int) -> list[str]:
        evicted = []
        while len(self._order) + room_for > self.capacity:
            idle = next((a for a in self._order if not self._users[a]), None)
            if idle is None:
                break
            log.info("evicting adapter %s (least recently used)", idle)
            self._forget(idle)
            evicted.append(idle)
        return evicted

    def _forget(self, adapter_id: str) -> None:
        del self._order[adapter_id]
        self._unload_when_idle.discard(adapter_id)
        self._publish()

    def _publish(self) -> None:
        self.ids = tuple(a for a in self._order if a not in self._unload_when_idle)
