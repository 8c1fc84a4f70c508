"""Seeded simulations of the A/B statistics: what peeking costs, what the sequential test buys, SRM's reach.

    .venv/bin/python bench/stats.py [--experiments 2000] [--seed 0]

1. A/A under continuous monitoring: both arms convert at 30%, the test is read after every batch
   of 100 units per arm up to 3x the fixed horizon. False-positive rate of the naive fixed-horizon
   z-test read at every look, against the always-valid mSPRT (target: <= alpha = 0.05).
2. A/B with a true +5-point effect (30% -> 35%, the plan's mde) and a +8-point one: power and
   median units per arm to a decision, sequential (peeking at every look, stopping at 3x the
   fixed horizon) against the fixed-horizon test sized for 80% power at +5 points and read once.
3. SRM: how often a 52/48 split is caught when 50/50 was configured, at 1k, 10k and 100k units,
   and how often an intended 95/5 split raises a false alarm.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from abtest.stats import fixed, power, sequential
from abtest.stats.sufficient import Proportion
from abtest.stats.srm import srm

ALPHA, BASE, EFFECT, MDE, BATCH = 0.05, 0.30, 0.05, 0.05, 100


def simulate(rng: np.random.Generator, rate_b: float, looks: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative successes per look for both arms of one experiment (BATCH units per arm per look)."""
    a = np.cumsum(rng.binomial(BATCH, BASE, looks))
    b = np.cumsum(rng.binomial(BATCH, rate_b, looks))
    return a, b


def first_rejection(a: np.ndarray, b: np.ndarray, test) -> int | None:
    """The first look (units per arm) at which ``test`` rejects, or None."""
    for look, (sa, sb) in enumerate(zip(a, b), start=1):
        n = look * BATCH
        p = test(Proportion(n, int(sa)), Proportion(n, int(sb)))
        if p is not None and p < ALPHA:
            return n
    return None


def naive(a: Proportion, b: Proportion) -> float | None:
    return fixed.two_proportions(a, b, ALPHA).p_value


def always_valid(a: Proportion, b: Proportion) -> float | None:
    return sequential.msprt(a, b, MDE, ALPHA).comparison.p_value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    horizon = power.proportion_sample_size_per_arm(BASE, EFFECT, ALPHA, 0.8)
    looks = int(np.ceil(3 * horizon / BATCH))
    started = time.perf_counter()
    rows = []

    aa = [simulate(rng, BASE, looks) for _ in range(args.experiments)]
    naive_fp = sum(first_rejection(a, b, naive) is not None for a, b in aa) / len(aa)
    ours_fp = sum(first_rejection(a, b, always_valid) is not None for a, b in aa) / len(aa)
    rows.append(("A/A false-positive rate, read at every look", f"{naive_fp:.3f}", f"{ours_fp:.3f}",
                 f"{naive_fp / ALPHA:.1f}x α", "ours <= 0.05"))

    fixed_look = int(np.ceil(horizon / BATCH))
    for effect in (EFFECT, 1.6 * EFFECT):
        ab = [simulate(rng, BASE + effect, looks) for _ in range(args.experiments)]
        fixed_power = sum(naive(Proportion(fixed_look * BATCH, int(a[fixed_look - 1])),
                                Proportion(fixed_look * BATCH, int(b[fixed_look - 1]))) < ALPHA for a, b in ab) / len(ab)
        stops = [first_rejection(a, b, always_valid) for a, b in ab]
        seq_power = sum(s is not None for s in stops) / len(stops)
        median_seq = statistics.median(s if s is not None else looks * BATCH for s in stops)
        points = f"+{effect * 100:.0f} points"
        rows.append((f"A/B {points}: power", f"{fixed_power:.3f}", f"{seq_power:.3f}", f"{seq_power / fixed_power:.2f}x",
                     "ours >= 0.8"))
        rows.append((f"A/B {points}: median units per arm to decision", f"{fixed_look * BATCH}", f"{median_seq:.0f}",
                     f"{median_seq / (fixed_look * BATCH):.2f}x", "ours < fixed"))

    srm_rows = []
    for units in (1_000, 10_000, 100_000):
        hits = 0
        for _ in range(args.experiments):
            a = int(rng.binomial(units, 0.52))
            hits += srm({"a": a, "b": units - a}, {"a": 50, "b": 50}).ok is False
        srm_rows.append((f"SRM caught: 52/48 configured 50/50, {units:,} units", f"{hits / args.experiments:.3f}"))
    alarms = 0
    for _ in range(args.experiments):
        control = int(rng.binomial(10_000, 0.95))
        alarms += srm({"control": control, "candidate": 10_000 - control}, {"control": 95, "candidate": 5}).ok is False
    srm_rows.append(("SRM false alarm: intended 95/5, 10,000 units", f"{alarms / args.experiments:.4f}"))

    print(f"{args.experiments} experiments per row, seed {args.seed}; fixed horizon {horizon} units per arm "
          f"(30% -> 35%, alpha {ALPHA}, power 0.8); looks every {BATCH} units per arm up to {looks * BATCH}\n")
    print(f"| {'quantity':<52} | {'naive / fixed':>13} | {'ours (mSPRT)':>12} | {'ratio':>6} | target |")
    print(f"|{'-' * 54}|{'-' * 15}|{'-' * 14}|{'-' * 8}|--------|")
    for name, baseline, ours, ratio, target in rows:
        print(f"| {name:<52} | {baseline:>13} | {ours:>12} | {ratio:>6} | {target} |")
    print(f"\n| {'SRM check (chi-square, p < 0.001)':<52} | {'rate':>6} |")
    print(f"|{'-' * 54}|{'-' * 8}|")
    for name, rate in srm_rows:
        print(f"| {name:<52} | {rate:>6} |")
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
