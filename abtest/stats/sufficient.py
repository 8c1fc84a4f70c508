"""Sufficient statistics of one arm: what Prometheus counters carry, and all the tests need."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Proportion:
    """``successes`` out of ``n`` binary outcomes."""

    n: int
    successes: int

    def __post_init__(self) -> None:
        if self.n < 0 or not 0 <= self.successes <= self.n:
            raise ValueError(f"a proportion needs 0 <= successes <= n, got successes={self.successes}, n={self.n}")

    def __add__(self, other: "Proportion") -> "Proportion":
        return Proportion(self.n + other.n, self.successes + other.successes)

    @property
    def mean(self) -> float:
        return self.successes / self.n if self.n else math.nan

    @property
    def variance(self) -> float:
        """Per-observation variance p(1 - p)."""
        p = self.mean
        return p * (1 - p)

    def as_mean(self) -> "Mean":
        """The same data as a ``Mean`` (x in {0, 1}, so the sum of squares is the sum)."""
        return Mean(self.n, float(self.successes), float(self.successes))


@dataclass(frozen=True)
class Mean:
    """``n`` real-valued outcomes as count, sum and sum of squares."""

    n: int
    sum: float
    sum_squares: float

    def __post_init__(self) -> None:
        if self.n < 0 or self.sum_squares < 0:
            raise ValueError(f"a mean needs n >= 0 and sum_squares >= 0, got n={self.n}, sum_squares={self.sum_squares}")

    @classmethod
    def of(cls, values: Iterable[float]) -> "Mean":
        values = [float(v) for v in values]
        return cls(len(values), math.fsum(values), math.fsum(v * v for v in values))

    def __add__(self, other: "Mean") -> "Mean":
        return Mean(self.n + other.n, self.sum + other.sum, self.sum_squares + other.sum_squares)

    @property
    def mean(self) -> float:
        return self.sum / self.n if self.n else math.nan

    @property
    def variance(self) -> float:
        """Sample variance (n - 1 in the denominator); clipped at 0 against rounding."""
        if self.n < 2:
            return math.nan
        return max((self.sum_squares - self.sum * self.sum / self.n) / (self.n - 1), 0.0)


def batch_means(buckets: Iterable[Mean | Proportion]) -> Mean:
    """One observation per non-empty time bucket (its mean): the batch-means unit.

    Sticky per-user assignment makes request-level observations clustered (a user's requests are
    correlated), so a request-level test understates the variance; bucket means are close to
    independent when buckets are long compared with a user's session.
    """
    return Mean.of(bucket.mean for bucket in buckets if bucket.n)
