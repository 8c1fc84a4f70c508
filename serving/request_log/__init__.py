"""The request log: one row per exchange (server or router), plus feedback keyed by request id.

Writers never block generation: ``RequestLog.record`` puts a row on a bounded queue and a
background thread writes batches to a ``Store``. When the queue is full, or the store refuses a
batch, rows are dropped and counted; ``close`` drains the queue. A redaction hook rewrites each
row (e.g. masks PII) in the writer thread before it is stored.

The training pipeline reads it back with ``Store.query`` (by route, arm, adapter, time window,
minimum feedback), feedback joined. Stores are sibling modules behind ``Store``: ``SQLiteStore``
is the embedded default (one file, WAL mode); ``PostgresStore`` is one database that several
router and server replicas share. ``open_store`` picks one from a path or a ``postgresql://`` URL.
"""

from serving.request_log.exchange import EXCHANGE_COLUMNS, Exchange, Feedback, LoggedExchange, hash_unit, new_request_id
from serving.request_log.postgres import PostgresStore
from serving.request_log.sqlite import SQLiteStore
from serving.request_log.store import RequestLogError, Store
from serving.request_log.target import open_store, parse_target
from serving.request_log.writer import Redactor, RequestLog

__all__ = [
    "EXCHANGE_COLUMNS", "Exchange", "Feedback", "LoggedExchange", "PostgresStore", "Redactor", "RequestLog", "RequestLogError",
    "SQLiteStore", "Store", "hash_unit", "new_request_id", "open_store", "parse_target",
]
