"""The request log's writer: a bounded queue in front of a ``Store``, drained by one background thread."""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Callable

from serving.request_log.exchange import Exchange, Feedback, without_surrogates
from serving.request_log.store import Store
from serving.request_log.target import open_store

log = logging.getLogger(__name__)

Redactor = Callable[[Exchange], Exchange]

_STOP = object()


class RequestLog:
    """Bounded asynchronous writer in front of a ``Store``.

    ``record``/``feedback`` never block: they return False (and count a drop) when the queue is
    full. A batch the store refuses (its database is gone) is dropped and counted the same way,
    so an outage costs rows, never serving. One bad row never costs its batch: text no store can
    hold (lone surrogates) is replaced and counted (``on_sanitise``), and when the store still
    refuses the batch its rows are written one by one, so only the rows it refuses on their own
    are dropped. ``flush`` waits for everything accepted so far; ``close`` flushes and stops.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_queue: int = 10_000,
        batch_size: int = 256,
        redact: Redactor | None = None,
        on_drop: Callable[[int], None] | None = None,  # called with the number of rows dropped (e.g. a Counter's inc)
        on_sanitise: Callable[[int], None] | None = None,  # called with the number of rows stored sanitised
    ):
        self.store = store
        self.redact = redact
        self.on_drop = on_drop
        self.on_sanitise = on_sanitise
        self.dropped = 0
        self.sanitised = 0
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
        rows = [row for row in (self._storable(item) for item in batch) if row is not None]
        if not rows:
            return
        try:
            self._store(rows)
        except Exception as error:
            # An outage refuses every row alike; otherwise some row is at fault, and only it is dropped.
            refused = [(row, error) for row in rows] if self.store.unavailable(error) else [
                (row, row_error) for row in rows if (row_error := self._store_alone(row)) is not None
            ]
            self._drop(len(refused))
            if len(refused) == len(rows):
                # The log must not take serving down; the failure is visible in logs and the drop counter.
                self.failed_batches += 1
                if not self._failing:
                    log.exception("request log: the store refused a batch of %d rows; dropping (and counting) rows until it accepts one", len(rows))
                self._failing = True
                return
            if refused:
                row, error = refused[0]
                log.warning("request log: stored %d rows of a batch, dropped %d the store refused on their own (the first, %s: %s)",
                            len(rows) - len(refused), len(refused), getattr(row, "request_id", "?"), error)
        if self._failing:
            log.warning("request log: the store accepts rows again (%d dropped so far)", self.dropped)
            self._failing = False

    def _storable(self, item: Exchange | Feedback) -> Exchange | Feedback | None:
        """The row as it is stored: redacted, surrogates replaced (and counted); None (counted as dropped) if redaction fails."""
        if self.redact and isinstance(item, Exchange):
            try:
                item = self.redact(item)
            except Exception:
                log.exception("request log: the redaction hook failed on a row; dropping it")  # storing it unredacted could leak
                self._drop(1)
                return None
        clean = without_surrogates(item)
        if clean is not item:
            self.sanitised += 1
            if self.on_sanitise:
                self.on_sanitise(1)
        return clean

    def _store(self, rows: list[Exchange | Feedback]) -> None:
        self.store.write([r for r in rows if isinstance(r, Exchange)], [r for r in rows if isinstance(r, Feedback)])

    def _store_alone(self, row: Exchange | Feedback) -> Exception | None:
        """Write one row of a refused batch on its own; the store's error when it refuses that row too."""
        try:
            self._store([row])
        except Exception as error:
            return error
        return None

    def __enter__(self) -> "RequestLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
