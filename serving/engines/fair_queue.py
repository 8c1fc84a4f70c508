"""Waiting requests, admitted round-robin by adapter so one busy adapter cannot starve the others.

Each adapter (the base model counts as one) has its own FIFO; ``pop`` takes the oldest request of
the next adapter in turn. Within an adapter, arrival order is kept.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, Hashable, Iterator, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """FIFO per key, served round-robin across keys."""

    def __init__(self):
        self._queues: OrderedDict[Hashable, deque[T]] = OrderedDict()  # next key to serve first
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        for queue in self._queues.values():
            yield from queue

    def push(self, key: Hashable, item: T) -> None:
        """Queue ``item`` behind the others of ``key``."""
        self._queues.setdefault(key, deque()).append(item)
        self._size += 1

    def pop(self) -> T:
        """The oldest item of the key whose turn it is; that key goes to the back of the rotation."""
        key, queue = next(iter(self._queues.items()))
        item = queue.popleft()
        del self._queues[key]
        if queue:
            self._queues[key] = queue
        self._size -= 1
        return item

    def clear(self) -> list[T]:
        """Remove and return everything, in rotation order."""
        items = list(self)
        self._queues.clear()
        self._size = 0
        return items
