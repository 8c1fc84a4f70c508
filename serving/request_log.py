"""The request log: one row per exchange (server or router), plus feedback keyed by request id.

Writers never block generation: ``RequestLog.record`` puts a row on a bounded queue and a
background thread writes batches to a ``Store``. When the queue is full the row is dropped and
counted; ``close`` drains the queue, so every row ``record`` accepted reaches the store. A
redaction hook rewrites each row (e.g. masks PII) in the writer thread before it is stored.

The training pipeline reads it back with ``Store.query`` (by route, arm, adapter, time window,
minimum feedback), feedback joined. ``SQLiteStore`` is the embedded default (WAL mode, so
readers never wait for writers); a Postgres or Parquet store implements the same ``Store``.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def new_request_id() -> str:
    """A fresh request id (32 hex characters)."""
    return uuid.uuid4().hex


def hash_unit(unit: str, salt: str = "") -> str:
    """The stored form of a unit id (user, session): a salted sha256, never the raw value."""
    return hashlib.sha256(f"{salt}\x00{unit}".encode()).hexdigest()[:32]


@dataclass
class Exchange:
    """One request and its answer, as served by the server or the router."""

    request_id: str
    prompt: str
    protocol: str  # lorax | openai_completions | openai_chat
    source: str = "server"  # server | router
    ts: float = field(default_factory=time.time)
    route: str | None = None
    arm: str | None = None
    adapter: str | None = None
    template_version: str | None = None
    config_version: str | None = None
    output: str | None = None
    parameters: dict = field(default_factory=dict)
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    status: int = 200
    outcome: str = "success"
    unit_hash: str | None = None
    fallback_from: str | None = None  # the arm whose upstream failed before this one answered
    shadow_of: str | None = None  # request id of the served exchange this shadow call mirrored
    shadow_agreement: bool | None = None


@dataclass
class Feedback:
    """A later judgement of an exchange (``metric`` as declared by its route)."""

    request_id: str
    metric: str
    value: float
    ts: float = field(default_factory=time.time)


@dataclass
class LoggedExchange:
    """An exchange read back, with its feedback: metric -> mean of the values given."""

    exchange: Exchange
    feedback: dict[str, float]


EXCHANGE_COLUMNS = [f.name for f in dataclasses.fields(Exchange)]
_NUMERIC = {"ts": "REAL", "latency_ms": "REAL", "ttft_ms": "REAL", "prompt_tokens": "INTEGER",
            "generated_tokens": "INTEGER", "status": "INTEGER", "shadow_agreement": "INTEGER"}


class Store(abc.ABC):
    """Where exchange and feedback rows live; writes come from one writer thread at a time."""

    @abc.abstractmethod
    def write(self, exchanges: list[Exchange], feedback: list[Feedback]) -> None:
        """Persist a batch atomically."""

    @abc.abstractmethod
    def query(
        self,
        *,
        route: str | None = None,
        arm: str | None = None,
        adapter: str | None = None,
        source: str | None = None,
        since: float | None = None,
        until: float | None = None,
        min_feedback: dict[str, float] | None = None,
        include_shadow: bool = False,
        limit: int | None = None,
    ) -> list[LoggedExchange]:
        """Exchanges matching every given filter, oldest first, feedback joined.

        ``min_feedback`` keeps exchanges whose mean feedback for each named metric is at least
        the given value (exchanges without that feedback are left out).
        """

    @abc.abstractmethod
    def arm_of(self, request_id: str) -> Exchange | None:
        """The served (non-shadow) exchange with this id, preferring the router's row."""

    def close(self) -> None:
        """Release connections."""


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS exchanges (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    {", ".join(f"{name} {_NUMERIC.get(name, 'TEXT')}" for name in EXCHANGE_COLUMNS)}
);
CREATE INDEX IF NOT EXISTS exchanges_request_id ON exchanges (request_id);
CREATE INDEX IF NOT EXISTS exchanges_route_arm_ts ON exchanges (route, arm, ts);
CREATE TABLE IF NOT EXISTS feedback (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_request_id ON feedback (request_id);
"""


class SQLiteStore(Store):
    """The embedded store: one SQLite file in WAL mode, safe to share between processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # One connection, used under a lock: the writer thread and readers may share this object.
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def write(self, exchanges: list[Exchange], feedback: list[Feedback]) -> None:
        rows = [
            tuple(json.dumps(getattr(e, c)) if c == "parameters" else getattr(e, c) for c in EXCHANGE_COLUMNS)
            for e in exchanges
        ]
        placeholders = ", ".join("?" for _ in EXCHANGE_COLUMNS)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    f"INSERT INTO exchanges ({', '.join(EXCHANGE_COLUMNS)}) VALUES ({placeholders})", rows
                )
                self._db.executemany(
                    "INSERT INTO feedback (request_id, metric, value, ts) VALUES (?, ?, ?, ?)",
                    [(f.request_id, f.metric, f.value, f.ts) for f in feedback],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _select(self, where: list[str], args: list, limit: int | None) -> list[Exchange]:
        sql = f"SELECT {', '.join(EXCHANGE_COLUMNS)} FROM exchanges"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts, row_id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        exchanges = []
        for row in rows:
            values = dict(zip(EXCHANGE_COLUMNS, row))
            values["parameters"] = json.loads(values["parameters"] or "{}")
            if values["shadow_agreement"] is not None:
                values["shadow_agreement"] = bool(values["shadow_agreement"])
            exchanges.append(Exchange(**values))
        return exchanges

    def _feedback_means(self, request_ids: list[str]) -> dict[str, dict[str, float]]:
        means: dict[str, dict[str, float]] = {}
        chunk = 500  # stays under SQLite's bound-parameter limit
        for start in range(0, len(request_ids), chunk):
            ids = request_ids[start : start + chunk]
            sql = (
                "SELECT request_id, metric, AVG(value) FROM feedback "
                f"WHERE request_id IN ({', '.join('?' for _ in ids)}) GROUP BY request_id, metric"
            )
            with self._lock:
                for request_id, metric, mean in self._db.execute(sql, ids):
                    means.setdefault(request_id, {})[metric] = mean
        return means

    def query(
        self,
        *,
        route: str | None = None,
        arm: str | None = None,
        adapter: str | None = None,
        source: str | None = None,
        since: float | None = None,
        until: float | None = None,
        min_feedback: dict[str, float] | None = None,
        include_shadow: bool = False,
        limit: int | None = None,
    ) -> list[LoggedExchange]:
        where, args = [], []
        for column, value in (("route", route), ("arm", arm), ("adapter", adapter), ("source", source)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts < ?")
            args.append(until)
        if not include_shadow:
            where.append("shadow_of IS NULL")
        for metric, threshold in (min_feedback or {}).items():
            where.append("request_id IN (SELECT request_id FROM feedback WHERE metric = ? GROUP BY request_id HAVING AVG(value) >= ?)")
            args += [metric, threshold]
        exchanges = self._select(where, args, limit)
        means = self._feedback_means(sorted({e.request_id for e in exchanges}))
        return [LoggedExchange(e, means.get(e.request_id, {})) for e in exchanges]

    def arm_of(self, request_id: str) -> Exchange | None:
        rows = self._select(["request_id = ?", "shadow_of IS NULL"], [request_id], None)
        rows.sort(key=lambda e: e.source != "router")
        return rows[0] if rows else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


Redactor = Callable[[Exchange], Exchange]

_STOP = object()


class RequestLog:
    """Bounded asynchronous writer in front of a ``Store``.

    ``record``/``feedback`` never block: they return False (and count a drop) when the queue is
    full. ``flush`` waits for everything accepted so far; ``close`` flushes and stops.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_queue: int = 10_000,
        batch_size: int = 256,
        redact: Redactor | None = None,
        on_drop: Callable[[], None] | None = None,
    ):
        self.store = store
        self.redact = redact
        self.on_drop = on_drop
        self.dropped = 0
        self.failed_batches = 0
        self._batch_size = batch_size
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="request-log-writer", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, path: str | Path, **kwargs) -> "RequestLog":
        """A writer over a SQLite file."""
        return cls(SQLiteStore(path), **kwargs)

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
            self.dropped += 1
            if self.on_drop:
                self.on_drop()
            return False

    def flush(self) -> None:
        """Block until every accepted row is written (or its batch failed and was logged)."""
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
        exchanges = [item for item in batch if isinstance(item, Exchange)]
        feedback = [item for item in batch if isinstance(item, Feedback)]
        try:
            if self.redact:
                exchanges = [self.redact(e) for e in exchanges]
            if exchanges or feedback:
                self.store.write(exchanges, feedback)
        except Exception:
            # The log must not take serving down; the failure is visible in logs and the counter.
            self.failed_batches += 1
            log.exception("request log: a batch of %d rows could not be written", len(batch))

    def __enter__(self) -> "RequestLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
