"""Status codes and the one result type every two-arm comparison returns."""

from __future__ import annotations

from dataclasses import dataclass

OK = "ok"
NO_DATA = "no_data"  # neither arm has observations
EMPTY_ARM = "empty_arm"  # one arm has none
TOO_FEW_SAMPLES = "too_few_samples"  # below what the method needs (or the plan's minimum)
ZERO_VARIANCE = "zero_variance"  # every observation equal in both arms: no test is possible

STATUSES = (OK, NO_DATA, EMPTY_ARM, TOO_FEW_SAMPLES, ZERO_VARIANCE)


@dataclass(frozen=True)
class Comparison:
    """Candidate vs control on one metric; fields other than ``status`` and ``method`` are None unless ``ok``.

    ``estimate`` and ``ci`` are the absolute difference candidate - control; ``relative_lift``
    and ``relative_ci`` the same relative to the control's mean.
    """

    method: str
    status: str
    control: float | None = None
    candidate: float | None = None
    estimate: float | None = None
    ci: tuple[float, float] | None = None
    p_value: float | None = None
    relative_lift: float | None = None
    relative_ci: tuple[float, float] | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


def degenerate(method: str, n_control: int, n_candidate: int, minimum: int = 1) -> Comparison | None:
    """The result for arms too small to test, or None when both have at least ``minimum``."""
    if n_control == 0 and n_candidate == 0:
        return Comparison(method, NO_DATA)
    if n_control == 0 or n_candidate == 0:
        return Comparison(method, EMPTY_ARM)
    if min(n_control, n_candidate) < minimum:
        return Comparison(method, TOO_FEW_SAMPLES)
    return None
