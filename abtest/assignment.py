"""Assignment of units to arms: pure functions of (salt, route, unit) and the weights.

``unit_hash`` maps a unit to a uniform number in [0, 1) with SHA-256 (as TensorZero does):
the same unit always gets the same number, and a new salt reshuffles every unit.

Why not one number against cumulative ranges: when weights are normalised, raising one arm's
weight shrinks every other range and shifts the boundaries between them, so units move between
arms whose weights did not change (the Istio weighted-subset problem). Carving candidates from the
top avoids that only for the one candidate next to the control. Instead each arm draws its own
number ``u_arm = unit_hash(salt, route/arm, unit)`` and the unit goes to the arm with the
smallest ``-ln(1 - u_arm) / weight`` (weighted rendezvous hashing, an exponential race):

* an arm wins with probability exactly ``weight / sum(weights)``;
* raising one arm's weight lowers only that arm's score, so units only move *into* it, from any
  arm (a monotone ramp); lowering it only moves units *out* of it;
* adding or removing an arm moves units only into or out of that arm; arm order never matters.

Weights are relative, so ramp a candidate by raising its weight alone (every other arm's share
shrinks in proportion). With two arms, moving weight from control to candidate (95/5 -> 80/20) is
the same thing. With three or more, lowering the control as well sends its leaving units to every
arm in proportion to the weights, not only to the candidate.
"""

from __future__ import annotations

import hashlib
import math
from typing import Mapping


def unit_hash(salt: str, route: str, unit: str) -> float:
    """A uniform number in [0, 1): the first 8 bytes of sha256(salt, route, unit) over 2**64."""
    digest = hashlib.sha256(f"{salt}\x00{route}\x00{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def arm_draws(salt: str, route: str, unit: str, arms: list[str] | tuple[str, ...]) -> dict[str, float]:
    """Each arm's own uniform number for this unit."""
    return {arm: unit_hash(salt, f"{route}/{arm}", unit) for arm in arms}


def choose_arm(weights: Mapping[str, float], draws: Mapping[str, float]) -> str:
    """The arm with the smallest exponential score ``-ln(1 - u) / w``; zero-weight arms never win.

    Raises ``ValueError`` when every weight is zero.
    """
    best, best_score = None, math.inf
    for arm in sorted(weights):  # a fixed order, so exact ties resolve the same way everywhere
        weight = weights[arm]
        if weight <= 0:
            continue
        score = -math.log1p(-draws[arm]) / weight
        if best is None or score < best_score:
            best, best_score = arm, score
    if best is None:
        raise ValueError("every arm has weight 0")
    return best


def assign(salt: str, route: str, unit: str, weights: Mapping[str, float]) -> str:
    """The arm a unit gets on a route under these weights."""
    return choose_arm(weights, arm_draws(salt, route, unit, list(weights)))
