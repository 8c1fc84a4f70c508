"""Assignment: proportions, stickiness, monotone ramps and reshuffling by salt."""

from __future__ import annotations

import math

import pytest

from abtest.assignment import assign, choose_arm, unit_hash

UNITS = [f"user-{i}" for i in range(20_000)]


def assignments(weights, salt="s", route="r"):
    return {unit: assign(salt, route, unit, weights) for unit in UNITS}


def test_unit_hash_is_uniform_and_deterministic():
    values = [unit_hash("s", "r", u) for u in UNITS]
    assert values == [unit_hash("s", "r", u) for u in UNITS]
    assert all(0 <= v < 1 for v in values)
    # Mean of n uniforms: sd = 1/sqrt(12 n); 5 sd is far beyond chance.
    assert abs(sum(values) / len(values) - 0.5) < 5 / math.sqrt(12 * len(values))


@pytest.mark.parametrize("weights", [{"a": 50, "b": 50}, {"a": 90, "b": 10}, {"a": 1, "b": 2, "c": 7}])
def test_proportions_within_binomial_tolerance(weights):
    chosen = list(assignments(weights).values())
    total = sum(weights.values())
    n = len(chosen)
    for arm, weight in weights.items():
        p = weight / total
        # 5 binomial standard deviations: a false failure has probability < 1e-6.
        assert abs(chosen.count(arm) - n * p) < 5 * math.sqrt(n * p * (1 - p)), arm


def test_same_unit_same_arm():
    assert assignments({"a": 1, "b": 1}) == assignments({"a": 1, "b": 1})


@pytest.mark.parametrize("ramped", ["b", "c"])
def test_raising_a_weight_only_moves_units_into_that_arm(ramped):
    before = assignments({"a": 80, "b": 10, "c": 10})
    for step in (20, 40, 80):
        weights = {"a": 80, "b": 10, "c": 10, ramped: step}
        after = assignments(weights)
        moved = [u for u in UNITS if before[u] != after[u]]
        assert moved and all(after[u] == ramped for u in moved)
        before = after


def test_two_arm_ramp_in_percent_moves_only_control_units_to_the_candidate():
    before = assignments({"teacher": 95, "student": 5})
    after = assignments({"teacher": 80, "student": 20})
    moved = [u for u in UNITS if before[u] != after[u]]
    assert moved and all(before[u] == "teacher" and after[u] == "student" for u in moved)


def test_adding_an_arm_only_moves_units_into_it():
    before = assignments({"a": 1, "b": 1})
    after = assignments({"a": 1, "b": 1, "c": 1})
    assert all(after[u] == "c" for u in UNITS if before[u] != after[u])


def test_salt_change_reshuffles():
    first = assignments({"a": 1, "b": 1}, salt="one")
    second = assignments({"a": 1, "b": 1}, salt="two")
    changed = sum(first[u] != second[u] for u in UNITS) / len(UNITS)
    assert 0.45 < changed < 0.55  # independent re-draws disagree half the time


def test_zero_weights():
    assert choose_arm({"a": 0, "b": 1}, {"a": 0.0, "b": 0.99}) == "b"
    with pytest.raises(ValueError):
        choose_arm({"a": 0}, {"a": 0.5})
