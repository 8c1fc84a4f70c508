"""Which store a request-log target names: a SQLite file path, or a ``postgresql://`` (``postgres://``) URL.

Every place that takes a request log (``--request-log``, ``data.source: request-log:...``) reads
its value here, so both forms work everywhere and a bad one fails the same way.
"""

from __future__ import annotations

from pathlib import Path

from serving.request_log.postgres import URL_FORM, URL_SCHEMES, PostgresStore, connection_parameters
from serving.request_log.sqlite import SQLiteStore
from serving.request_log.store import RequestLogError, Store


def parse_target(value: str | Path) -> Path | str:
    """A PostgreSQL URL as given (its syntax checked), else a SQLite path; raises ``RequestLogError``."""
    if isinstance(value, Path):
        return value
    if value.startswith(URL_SCHEMES):
        connection_parameters(value)
        return value
    if "://" in value:
        raise RequestLogError(f"{value.split('://')[0]}:// is not a request-log store; pass a SQLite file path or {URL_FORM}")
    return Path(value).expanduser()


def open_store(target: str | Path) -> Store:
    """The store ``target`` names, opened (schema created when absent); raises ``RequestLogError``."""
    target = parse_target(target)
    return PostgresStore(target) if isinstance(target, str) else SQLiteStore(target)
