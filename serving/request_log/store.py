"""The interface every request-log store implements (SQLite file, PostgreSQL database, ...)."""

from __future__ import annotations

import abc

from serving.request_log.exchange import Exchange, Feedback, LoggedExchange


class RequestLogError(ValueError):
    """A request-log target that cannot be opened (a bad URL, an unreachable database); the message says what to fix."""


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

    def unavailable(self, error: Exception) -> bool:
        """``error`` (raised by ``write``) means the database cannot take any row now, not that it refused these rows."""
        return False

    def close(self) -> None:
        """Release connections."""
