"""Corrections for testing several metrics at once (statsmodels' implementations)."""

from __future__ import annotations

from collections.abc import Sequence

from statsmodels.stats.multitest import multipletests

CORRECTIONS = {"holm": "holm", "bh": "fdr_bh"}


def adjust(p_values: Sequence[float | None], correction: str = "holm") -> list[float | None]:
    """Adjusted p-values in the input order: Holm (family-wise error) or Benjamini-Hochberg (false discovery rate).

    ``None`` entries (metrics without a test) are kept in place and do not count as tests.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction {correction!r} is not one of {sorted(CORRECTIONS)}")
    present = [i for i, p in enumerate(p_values) if p is not None]
    adjusted: list[float | None] = [None] * len(p_values)
    if present:
        values = multipletests([p_values[i] for i in present], method=CORRECTIONS[correction])[1]
        for i, value in zip(present, values):
            adjusted[i] = float(value)
    return adjusted
