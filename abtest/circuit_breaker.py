"""A circuit breaker per upstream: after repeated failures, skip it for a while.

Closed: calls go through. After ``threshold`` consecutive failures it opens for ``open_s``
seconds (calls are refused at once, so a dead upstream costs no timeout per request). Then it is
half-open: one trial call is let through; its success closes the breaker, its failure opens it
again, and ``release`` (the trial ended without saying anything about the upstream) lets the
next call be the trial. While the trial runs, a call with nowhere else to go is let through
too: refusing it would be a certain error, trying it is not.

What counts as a failure is the caller's decision (``abtest.router``: never a refusal of the
request itself, so no client can open a breaker).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0
    trial_running: bool = False


@dataclass
class CircuitBreaker:
    """Breaker state for any number of keys (upstream URLs)."""

    threshold: int = 3
    open_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _states: dict[str, _State] = field(default_factory=dict)

    def allow(self, key: str, last_resort: bool = False) -> bool:
        """Whether a call to ``key`` may go out now; ``last_resort``: the caller has no other upstream to try."""
        state = self._states.get(key)
        if state is None or state.failures < self.threshold:
            return True
        if self.clock() < state.open_until:
            return False
        if state.trial_running:
            return last_resort
        state.trial_running = True  # half-open: this call is the trial
        return True

    def success(self, key: str) -> None:
        """Record a good answer: the breaker closes."""
        self._states.pop(key, None)

    def failure(self, key: str) -> None:
        """Record a failed call: count it, and (re)open the breaker at the threshold."""
        state = self._states.setdefault(key, _State())
        state.failures += 1
        state.trial_running = False
        if state.failures >= self.threshold:
            state.open_until = self.clock() + self.open_s

    def release(self, key: str) -> None:
        """A call ended with no verdict on the upstream (the request's fault, a client gone): neither counted nor a trial any more."""
        state = self._states.get(key)
        if state is not None:
            state.trial_running = False

    def is_open(self, key: str) -> bool:
        """Whether ``key`` is currently kept out."""
        state = self._states.get(key)
        return state is not None and state.failures >= self.threshold and self.clock() < state.open_until
