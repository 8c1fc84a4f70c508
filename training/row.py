"""A row: one example of a task on its way from a data source through labelling, curation,
training and evaluation.

Each stage returns new rows (``dataclasses.replace``) with the fields it adds; the row files of a
run (``data/rows.jsonl``, ``train.jsonl``, ``test.jsonl``) hold one row per line as
:meth:`Row.to_json` writes it. Every row has ``id``, ``inputs``, ``output``, ``gold`` and
``split`` on disk; the other keys are written only when set, in the order the stages add them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Split = Literal["train", "test"]


class RowError(ValueError):
    """A JSON object is not a row; the message names the key and the fix."""


@dataclass(frozen=True)
class Row:
    """One example of a task, with what the teacher, the judge and curation said about it."""

    id: str
    """Stable identity: the source's ``id`` column, a logged request's id, or ``<file>:<index>``."""
    inputs: Mapping[str, str]
    """The task's input fields by name; empty text where the source had none (curation drops the row)."""
    output: str | None = None
    """What the student learns: the teacher's answer, or the gold label without a teacher; None until labelled."""
    gold: str | None = None
    """The reference answer evaluation scores against, when the source has one."""
    split: Split | None = None
    """``train`` or ``test``; None until curation splits it (unless the source fixes it)."""
    teacher: str | None = None
    """The endpoint that labelled ``output`` (``protocol:url#model``)."""
    teacher_logprob: float | None = None
    """Summed log-probability of the teacher's generated tokens, when the endpoint reports it."""
    teacher_tokens: tuple[int, ...] | None = None
    """The teacher's generated token ids, when the endpoint reports them."""
    teacher_top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    """Per generated token, the teacher's top-k ``(token id, logprob)`` pairs, best first (logit distillation)."""
    label_error: str | None = None
    """Why labelling failed for good (``output`` is then None)."""
    teacher_samples: tuple[str, ...] | None = None
    """The teacher's extra answers at a temperature above zero (self-consistency)."""
    teacher_samples_error: str | None = None
    """Why sampling the teacher failed for good (no ``teacher_samples`` then)."""
    judge_score: float | None = None
    """The judge's score of ``judge_output``; None when the judge gave no number (see ``judge_error``)."""
    judge_output: str | None = None
    """The output the judge scored (a relabelled row's score no longer applies)."""
    judge_error: str | None = None
    """Why the judge gave no score."""

    def __post_init__(self):
        # rows read from JSON carry lists; a frozen row holds tuples
        object.__setattr__(self, "inputs", dict(self.inputs))
        for name in ("teacher_tokens", "teacher_samples"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.teacher_top_logprobs is not None:
            tops = tuple(tuple(tuple(pair) for pair in top) for top in self.teacher_top_logprobs)
            object.__setattr__(self, "teacher_top_logprobs", tops)

    def to_json(self) -> dict[str, Any]:
        """The row as one line of a row file: the five core keys, then every other key that is set."""
        record: dict[str, Any] = {name: getattr(self, name) for name in CORE_FIELDS}
        record["inputs"] = dict(self.inputs)
        for name in OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None or (name == "judge_score" and self.judge_output is not None):
                record[name] = value
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Row:
        """The row a line of a row file holds; :class:`RowError` names an unknown or missing key."""
        if not isinstance(record, Mapping):
            raise RowError(f"a row is a JSON object, not {type(record).__name__}")
        unknown = [key for key in record if key not in FIELDS]
        if unknown:
            raise RowError(f"unknown key {unknown[0]!r}; a row has only {', '.join(FIELDS)}: remove the key or rebuild the file with `stillhouse data build`")
        missing = [key for key in ("id", "inputs") if key not in record]
        if missing:
            raise RowError(f"no {missing[0]!r} key; every row has id and inputs: rebuild the file with `stillhouse data build`")
        if not isinstance(record["inputs"], Mapping):
            raise RowError(f"'inputs' is {type(record['inputs']).__name__}, not an object of the task's input fields: rebuild the file with `stillhouse data build`")
        return cls(**record)


FIELDS = tuple(field.name for field in dataclasses.fields(Row))
CORE_FIELDS = ("id", "inputs", "output", "gold", "split")
OPTIONAL_FIELDS = tuple(name for name in FIELDS if name not in CORE_FIELDS)
