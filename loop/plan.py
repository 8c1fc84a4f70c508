"""How big each stage of the demo is: the full loop on gemma-3-270m, or ``--quick`` on the tiny model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoPlan:
    """The sizes of one demo run; everything else about the loop is fixed."""

    base: str
    users: int  # simulated users, each sticky to one arm by its id (even, and more than a look's requests)
    teacher_requests: int  # live requests the teacher answers before any student exists
    concurrency: int  # requests in flight at once
    train_steps: int
    gold_rows: int  # held-out gold rows teacher and student are scored on
    ab_requests: int  # live requests while the student is ramped (at most)
    ab_seconds: float  # how long the ramp may run (at most)
    look_interval_s: float  # seconds between the watch's looks
    ramp_steps: tuple[float, ...]
    min_minutes_per_step: float
    min_samples_per_arm: int
    scrape_interval_s: int  # Prometheus' scrape interval


# The ramp's first step must collect min_samples_per_arm candidate requests before the guardrails can hold.
FULL = DemoPlan(
    base="gemma-3-270m", users=2000, teacher_requests=600, concurrency=16, train_steps=120, gold_rows=300,
    ab_requests=1500, ab_seconds=300, look_interval_s=15, ramp_steps=(25, 50, 100), min_minutes_per_step=0.5,
    min_samples_per_arm=50, scrape_interval_s=2,
)

QUICK = DemoPlan(
    base="tiny", users=400, teacher_requests=64, concurrency=8, train_steps=8, gold_rows=24,
    ab_requests=240, ab_seconds=45, look_interval_s=3, ramp_steps=(50, 100), min_minutes_per_step=0.1,
    min_samples_per_arm=10, scrape_interval_s=1,
)
