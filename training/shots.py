"""Few-shot selection: which gold rows a teacher prompt shows before the question.

A :class:`ShotPool` holds the gold rows shots may come from (never the evaluation rows: see
:func:`pool_rows`) and chooses ``n`` of them for a row in one of three ways:

- ``fixed``: the same shots for every row (the first ``n`` of a seeded shuffle);
- ``balanced``: the same for every row, taken round-robin over the task's labels, so every
  label (``neutral`` included) is shown;
- ``nearest``: per row, the ``n`` pool rows whose inputs are most similar to its input
  (MinHash estimate of the Jaccard similarity of word sets), most similar last, next to the
  question: dynamic few-shot.

The row being asked about is never one of its own shots (same id or same input text).
"""

from __future__ import annotations

import random
import re
from typing import Literal

import numpy as np
from datasketch import MinHash

from training.config import ConfigError, DataConfig
from training.dataset import assign_splits
from training.row import Row
from training.task import Task

Selection = Literal["fixed", "balanced", "nearest"]
SELECTIONS: tuple[Selection, ...] = ("fixed", "balanced", "nearest")
_NUM_PERM = 64


def pool_rows(rows: list[Row], task: Task, data: DataConfig, exclude: set[str] = frozenset()) -> list[Row]:
    """Rows with a gold label that are (or, split by input hash, will be) training rows, minus ``exclude`` ids."""
    return [row for row in assign_splits(rows, task, data.test_fraction, data.seed)
            if row.gold is not None and row.split == "train" and row.id not in exclude]


class ShotPool:
    """Gold rows to take shots from, shuffled once by ``seed`` so fixed choices are reproducible."""

    def __init__(self, rows: list[Row], task: Task, seed: int = 0):
        self.task = task
        self.rows = sorted(rows, key=lambda row: row.id)
        random.Random(seed).shuffle(self.rows)
        self._signatures: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def choose(self, row: Row, n: int, how: Selection) -> list[Row]:
        """``n`` shots for ``row`` (fewer when the pool is smaller), in prompt order."""
        own = self.task.input_text(row.inputs)
        allowed = [i for i, shot in enumerate(self.rows) if shot.id != row.id and self.task.input_text(shot.inputs) != own]
        if how == "fixed":
            picks = allowed[:n]
        elif how == "balanced":
            picks = self._balanced(allowed, n)
        else:
            similarity = self._similarity(own)
            # most similar first, pool order among equals; then reversed so the closest sits next to the question
            picks = sorted(allowed, key=lambda i: -similarity[i])[:n][::-1]
        return [self.rows[i] for i in picks]

    def _balanced(self, allowed: list[int], n: int) -> list[int]:
        if self.task.output.type != "labels":
            raise ValueError("balanced shots need a task whose output is a label set; choose fixed or nearest")
        queues = {label: [i for i in allowed if self.task.parse(self.rows[i].gold).value == label] for label in self.task.output.labels}
        picks: list[int] = []
        while len(picks) < n and any(queues.values()):
            for label in self.task.output.labels:
                if queues[label] and len(picks) < n:
                    picks.append(queues[label].pop(0))
        return picks

    def _similarity(self, text: str) -> np.ndarray:
        if self._signatures is None:
            self._signatures = np.array([_signature(self.task.input_text(shot.inputs)) for shot in self.rows]).reshape(len(self.rows), _NUM_PERM)
        return (self._signatures == _signature(text)).mean(axis=1)


def _signature(text: str) -> np.ndarray:
    """The MinHash signature of the text's set of lower-cased words."""
    signature = MinHash(num_perm=_NUM_PERM, seed=1)
    signature.update_batch([word.encode() for word in set(re.findall(r"\w+", text.lower()))] or [b""])
    return signature.hashvalues


def pool_for(variant, task: Task, rows: list[Row], data: DataConfig, exclude: set[str] = frozenset()) -> ShotPool | None:
    """The shot pool a :class:`~training.teacher_variant.TeacherVariant` needs (None when it shows no gold shots).

    Raises ConfigError naming the fix when the variant needs shots and no gold training row exists.
    """
    if not variant.uses_shots:
        return None
    pool = ShotPool(pool_rows(rows, task, data, exclude), task, variant.seed)
    if not len(pool):
        raise ConfigError(f"teacher variant {variant.name!r} shows {variant.shots} gold shots but no training row has a gold label; "
                         "build the run from a source with gold labels (the task's generator, a labelled file) or import corrections")
    return pool
