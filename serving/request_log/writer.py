"""The request log's writer: a bounded queue in front of a ``Store``, drained by one background thread."""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Callable

from serving.request_log.exchange import Exchange, Feedback
from serving.request_log.store import Store
from serving.request_log.target import open_store

log = logging.getLogger(__name__)

Redactor = Callable[[Exchange], Exchange]

_STOP = object()


class RequestLog:
    """Bounded asynchronous writer in front of a ``Store``.

    ``record``/``feedback`` never block: they return False (and count a drop) when the queue is
    full. A batch the store refuses (its database is gone) is dropped and counted the same way,
    so an outage costs rows, never serving. ``flush`` waits for everything accepted so far;
    ``close`` flushes and stops.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_queue: int = 10_000,
        batch_size: int = 256,
        redact: Redactor | None = None,
        on_drop: Callable[[int], None] | None = None,  # called with the number of rows dropped (e.g. a Counter's inc)
    ):
        self.store = store
        self.redact = redact
        self.on_drop = on_drop
        self.dropped = 0
        self.failed_batches = 0
        self._drops = threading.Lock()  # record() and the writer thread both count drops
        self._failing = False  # the last batch was refused: log the first refusal and the recovery only
        self._batch_size = batch_size
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="request-log-writer", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, target: str | Path, **kwargs) -> "RequestLog":
        """A writer over the store ``target`` names: a SQLite path or a ``postgresql://`` URL (see ``open_store``)."""
        return cls(open_store(target), **kwargs)

    def record(self, exchange: Exchange) -> bool:
        """Queue an exchange; False when it was dropped because the writer is behind."""
        return self._put(exchange)

    def feedback(self, item: Feedback) -> bool:
        """Queue a feedback row; False when it was dropped."""
        return self._put(item)

    def _put(self, item: Exchange | Feedback) -> bool:
        if self._closed:
            raise RuntimeError("the request log is closed")
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self._drop(1)
            return False

    def _drop(self, rows: int) -> None:
        with self._drops:
            self.dropped += rows
        if self.on_drop:
            self.on_drop(rows)

    def flush(self) -> None:
        """Block until every accepted row is written (or dropped with its refused batch)."""
        self._queue.join()

    def close(self) -> None:
        """Write everything accepted so far, stop the writer thread, close the store."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)  # blocking put: the stop marker must not be dropped
        self._thread.join()
        self.store.close()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < self._batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = any(item is _STOP for item in batch)
            self._write([item for item in batch if item is not _STOP])
            for _ in batch:
                self._queue.task_done()

    def _write(self, batch: list) -> None:
        if not batch:
            return
        exchanges = [item for item in batch if isinstance(item, Exchange)]
        feedback = [item for item in batch if isinstance(item, Feedback)]
        try:
            if self.redact:
                exchanges = [self.redact(e) for e in exchanges]
            self.store.write(exchanges, feedback)
        except Exception:
            # The log must not take serving down; the failure is visible in logs and the drop counter.
            self.failed_batches += 1
            self._drop(len(batch))
            if not self._failing:
                log.exception("request log: the store refused a batch of %d rows; dropping (and counting) rows until it accepts one", len(batch))
            self._failing = True
            return
        if self._failing:
            log.warning("request log: the store accepts rows again (%d dropped so far)", self.dropped)
            self._failing = False

    def __enter__(self) -> "RequestLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
