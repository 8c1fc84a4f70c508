"""What the SQL stores share: one schema and one query language, spelled in each database's dialect.

Both databases hold the same tables, columns and indexes; only column types, the row-id column
and the parameter placeholder differ. A subclass supplies those, the batch insert and the fetch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from serving.request_log.exchange import EXCHANGE_COLUMNS, Exchange, Feedback, LoggedExchange
from serving.request_log.store import Store

# Column kinds; a column not named here holds text.
_KINDS = {"ts": "real", "latency_ms": "real", "ttft_ms": "real", "prompt_tokens": "integer", "generated_tokens": "integer",
          "status": "integer", "shadow_agreement": "boolean", "parameters": "json"}
FEEDBACK_COLUMNS = ["request_id", "metric", "value", "ts"]
_IN_CHUNK = 500  # ids per IN (...) list: under SQLite's bound-parameter limit


@dataclass(frozen=True)
class Dialect:
    """How one database spells the shared schema and its queries."""

    placeholder: str  # a bound parameter: "?" (sqlite3) or "%s" (psycopg)
    row_id: str  # the auto-numbered primary key column's type
    types: dict[str, str]  # column kind (text, real, integer, boolean, json) -> SQL type

    def schema(self) -> list[str]:
        """The statements that create both tables and their indexes when absent."""
        real = self.types["real"]
        columns = ", ".join(f"{name} {self.types[_KINDS.get(name, 'text')]}" for name in EXCHANGE_COLUMNS)
        return [
            f"CREATE TABLE IF NOT EXISTS exchanges (row_id {self.row_id}, {columns})",
            "CREATE INDEX IF NOT EXISTS exchanges_request_id ON exchanges (request_id)",
            "CREATE INDEX IF NOT EXISTS exchanges_route_arm_ts ON exchanges (route, arm, ts)",
            f"CREATE TABLE IF NOT EXISTS feedback (row_id {self.row_id}, request_id TEXT NOT NULL, metric TEXT NOT NULL, "
            f"value {real} NOT NULL, ts {real} NOT NULL)",
            "CREATE INDEX IF NOT EXISTS feedback_request_id ON feedback (request_id)",
        ]

    def insert(self, table: str, columns: list[str]) -> str:
        """An INSERT of one row into ``table``, for ``executemany``."""
        return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(self.placeholder for _ in columns)})"


class SQLStore(Store):
    """A ``Store`` over a SQL database: query, ``arm_of`` and ``write`` in terms of a dialect, a fetch and a batch insert."""

    dialect: Dialect

    @abc.abstractmethod
    def _fetch(self, sql: str, args: list) -> list[tuple]:
        """Every row ``sql`` selects."""

    @abc.abstractmethod
    def _insert(self, exchanges: list[tuple], feedback: list[tuple]) -> None:
        """Insert encoded exchange and feedback rows in one transaction."""

    @abc.abstractmethod
    def _encode(self, exchange: Exchange) -> tuple:
        """An exchange as the values of ``EXCHANGE_COLUMNS``, in this database's types."""

    @abc.abstractmethod
    def _decode(self, values: dict) -> Exchange:
        """An exchange from a selected row (column name -> value)."""

    def write(self, exchanges: list[Exchange], feedback: list[Feedback]) -> None:
        self._insert([self._encode(e) for e in exchanges], [(f.request_id, f.metric, f.value, f.ts) for f in feedback])

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
        p = self.dialect.placeholder
        where, args = [], []
        for column, value in (("route", route), ("arm", arm), ("adapter", adapter), ("source", source)):
            if value is not None:
                where.append(f"{column} = {p}")
                args.append(value)
        if since is not None:
            where.append(f"ts >= {p}")
            args.append(since)
        if until is not None:
            where.append(f"ts < {p}")
            args.append(until)
        if not include_shadow:
            where.append("shadow_of IS NULL")
        for metric, threshold in (min_feedback or {}).items():
            where.append(f"request_id IN (SELECT request_id FROM feedback WHERE metric = {p} GROUP BY request_id HAVING AVG(value) >= {p})")
            args += [metric, threshold]
        exchanges = self._select(where, args, limit)
        means = self._feedback_means(sorted({e.request_id for e in exchanges}))
        return [LoggedExchange(e, means.get(e.request_id, {})) for e in exchanges]

    def arm_of(self, request_id: str) -> Exchange | None:
        rows = self._select([f"request_id = {self.dialect.placeholder}", "shadow_of IS NULL"], [request_id], None)
        rows.sort(key=lambda e: e.source != "router")
        return rows[0] if rows else None

    def _select(self, where: list[str], args: list, limit: int | None) -> list[Exchange]:
        sql = f"SELECT {', '.join(EXCHANGE_COLUMNS)} FROM exchanges"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts, row_id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [self._decode(dict(zip(EXCHANGE_COLUMNS, row))) for row in self._fetch(sql, args)]

    def _feedback_means(self, request_ids: list[str]) -> dict[str, dict[str, float]]:
        means: dict[str, dict[str, float]] = {}
        for start in range(0, len(request_ids), _IN_CHUNK):
            ids = request_ids[start : start + _IN_CHUNK]
            sql = (
                "SELECT request_id, metric, AVG(value) FROM feedback "
                f"WHERE request_id IN ({', '.join(self.dialect.placeholder for _ in ids)}) GROUP BY request_id, metric"
            )
            for request_id, metric, mean in self._fetch(sql, ids):
                means.setdefault(request_id, {})[metric] = mean
        return means
