"""The shared store: one PostgreSQL database that any number of servers and router replicas write at once.

Same tables, columns and indexes as the SQLite file (``parameters`` is JSONB, ``shadow_agreement``
a boolean). The first connection of every process creates the schema when absent, under an
advisory lock, so replicas that start together do not race. A batch is one COPY per table in one
transaction. When the database goes away the store fails fast (a reconnect at most once a
second), so the writer drops and counts rows instead of stalling; reads raise until it is back.
PostgreSQL cannot hold NUL characters or NaN in JSON: they are stored as U+FFFD and as strings.
"""

from __future__ import annotations

import math
import re
import threading
import time

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from serving.request_log.exchange import EXCHANGE_COLUMNS, Exchange
from serving.request_log.sql import FEEDBACK_COLUMNS, Dialect, SQLStore
from serving.request_log.store import RequestLogError

POSTGRES = Dialect(
    placeholder="%s",
    row_id="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    types={"text": "TEXT", "real": "DOUBLE PRECISION", "integer": "INTEGER", "boolean": "BOOLEAN", "json": "JSONB"},
)
URL_SCHEMES = ("postgresql://", "postgres://")
URL_FORM = "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
_SCHEMA_LOCK = 0x7374696C6C  # pg_advisory_xact_lock key held while creating the schema
# Fail rather than hang when the database is lost (the URL may override any of these).
_CONNECT_DEFAULTS = {"connect_timeout": "5", "tcp_user_timeout": "10000", "application_name": "stillhouse-request-log"}
_RECONNECT_INTERVAL_S = 1.0


def redacted(text: str) -> str:
    """``text`` (a URL, or a message quoting one) with every password in it masked."""
    text = re.sub(r"(://[^:/@\s\"']*):[^@/\s\"']*@", r"\1:***@", text)
    return re.sub(r"([?&]password=)[^&\s\"']*", r"\1***", text)


def connection_parameters(url: str) -> dict[str, str]:
    """libpq's connection parameters for ``url``; raises ``RequestLogError`` naming what is wrong with it."""
    if not url.startswith(URL_SCHEMES):
        raise RequestLogError(f"{redacted(url)!r} is not a PostgreSQL URL; write {URL_FORM}")
    try:
        parameters = conninfo_to_dict(url)
    except psycopg.ProgrammingError as error:
        raise RequestLogError(f"{redacted(url)!r} is not a valid PostgreSQL URL ({redacted(str(error).strip())}); write {URL_FORM}") from error
    port = parameters.get("port", "5432")
    if not all(part.isdigit() for part in port.split(",")):
        raise RequestLogError(f"{redacted(url)!r}: port {port!r} is not a number; write {URL_FORM}")
    return {**_CONNECT_DEFAULTS, **parameters}


def _storable_text(value):
    """A column value with the NUL characters PostgreSQL text refuses replaced."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _storable_json(value):
    """A JSON value with what JSONB refuses replaced: NUL in strings, non-finite numbers."""
    if isinstance(value, dict):
        return {_storable_text(k): _storable_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf, -inf
    return _storable_text(value)


class PostgresStore(SQLStore):
    """A request log in a PostgreSQL database, shared by every process given the same URL."""

    dialect = POSTGRES

    def __init__(self, url: str):
        self.url = url
        self._parameters = connection_parameters(url)
        self._lock = threading.Lock()  # one connection, shared by the writer thread and readers
        self._closed = False
        self._retry_at = 0.0
        try:
            self._db: psycopg.Connection | None = self._connect()
        except psycopg.OperationalError as error:
            reason = str(error).strip().splitlines()[0].removeprefix("connection failed: ") if str(error).strip() else type(error).__name__
            raise RequestLogError(
                f"cannot reach the PostgreSQL database {redacted(url)} ({reason}); start it, or fix the host, port, user, "
                "password or database in the URL"
            ) from error

    def _connect(self) -> psycopg.Connection:
        db = psycopg.connect(**self._parameters, autocommit=True)
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in POSTGRES.schema():
                db.execute(statement)
        return db

    def _connection(self) -> psycopg.Connection:
        """The open connection; after the database went away, a new one (one attempt a second at most)."""
        if self._closed:
            raise RuntimeError("the PostgreSQL store is closed")
        if self._db is not None and not self._db.broken:
            return self._db
        if self._db is not None:
            self._db.close()
            self._db = None
        if time.monotonic() < self._retry_at:
            raise psycopg.OperationalError(f"{redacted(self.url)} was unreachable a moment ago; trying again shortly")
        try:
            self._db = self._connect()
        except psycopg.OperationalError:
            self._retry_at = time.monotonic() + _RECONNECT_INTERVAL_S
            raise
        return self._db

    def _encode(self, exchange: Exchange) -> tuple:
        return tuple(
            Jsonb(_storable_json(exchange.parameters)) if c == "parameters" else _storable_text(getattr(exchange, c))
            for c in EXCHANGE_COLUMNS
        )

    def _decode(self, values: dict) -> Exchange:
        values["parameters"] = values["parameters"] or {}
        return Exchange(**values)

    def _insert(self, exchanges: list[tuple], feedback: list[tuple]) -> None:
        with self._lock:
            db = self._connection()
            with db.transaction(), db.cursor() as cursor:
                for table, columns, rows in (("exchanges", EXCHANGE_COLUMNS, exchanges), ("feedback", FEEDBACK_COLUMNS, feedback)):
                    if rows:
                        with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                            for row in rows:
                                copy.write_row(row)

    def unavailable(self, error: Exception) -> bool:
        return isinstance(error, psycopg.OperationalError)  # the connection, not the data: unreachable, shut down

    def _fetch(self, sql: str, args: list) -> list[tuple]:
        with self._lock:
            return self._connection().execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._db is not None:
                self._db.close()
