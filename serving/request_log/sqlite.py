"""The embedded request-log store: one SQLite file in WAL mode, so readers never wait for writers."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from serving.request_log.exchange import EXCHANGE_COLUMNS, Exchange
from serving.request_log.sql import FEEDBACK_COLUMNS, Dialect, SQLStore
from serving.request_log.store import RequestLogError

SQLITE = Dialect(
    placeholder="?",
    row_id="INTEGER PRIMARY KEY AUTOINCREMENT",
    types={"text": "TEXT", "real": "REAL", "integer": "INTEGER", "boolean": "INTEGER", "json": "TEXT"},
)


class SQLiteStore(SQLStore):
    """The embedded store: one SQLite file in WAL mode, safe to share between processes of one machine."""

    dialect = SQLITE

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One connection, used under a lock: the writer thread and readers may share this object.
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(";\n".join(SQLITE.schema()))
        except (OSError, sqlite3.Error) as error:
            raise RequestLogError(f"cannot open the SQLite file {self.path} ({error}); pass a writable path to a SQLite file") from error

    def _encode(self, exchange: Exchange) -> tuple:
        return tuple(json.dumps(exchange.parameters) if c == "parameters" else getattr(exchange, c) for c in EXCHANGE_COLUMNS)

    def _decode(self, values: dict) -> Exchange:
        values["parameters"] = json.loads(values["parameters"] or "{}")
        if values["shadow_agreement"] is not None:
            values["shadow_agreement"] = bool(values["shadow_agreement"])
        return Exchange(**values)

    def _insert(self, exchanges: list[tuple], feedback: list[tuple]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(SQLITE.insert("exchanges", EXCHANGE_COLUMNS), exchanges)
                self._db.executemany(SQLITE.insert("feedback", FEEDBACK_COLUMNS), feedback)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def unavailable(self, error: Exception) -> bool:
        return isinstance(error, sqlite3.OperationalError)  # locked, disk full or I/O error, whatever the rows

    def _fetch(self, sql: str, args: list) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
