"""Batching: rows → tokenised examples → micro-batches of tensors.

- :func:`encode` tokenises each row's student prompt and completion (+ EOS), with the teacher's
  top-k at the aligned completion positions when distilling logits.
- :func:`epoch_batches` groups examples of similar length (length buckets) so padding stays
  small; the order is a pure function of (seed, epoch), which is what makes resuming exact.
- :func:`collate` right-pads a micro-batch, or packs it into rows of up to ``pack_width`` tokens
  with attention kept inside each example (:func:`packed_attention`); labels cover completion
  tokens only.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from training.config import TrainSettings
from training.row import Row
from training.task import Task

IGNORE = -100  # label of positions the loss skips (prompt and padding)
_BUCKET_BATCHES = 50  # batches per sorting window: long enough to group lengths, short enough to stay shuffled

#: one completion position's distillation target: the teacher's top-k token ids and log-probabilities
TeacherTop = tuple[tuple[int, ...], tuple[float, ...]]


@dataclass(frozen=True)
class Example:
    """One tokenised row: prompt then completion ids; the loss covers ids from ``prompt_length`` on.

    ``teacher_top`` (logit distillation only) holds one entry per completion id: the teacher's
    top-k at that position, or None where the position is trained with cross-entropy alone.
    """

    input_ids: list[int]
    prompt_length: int
    teacher_top: tuple[TeacherTop | None, ...] = ()


def encode(rows: list[Row], task: Task, tokenizer, max_length: int, kd_top_k: int = 0) -> tuple[list[Example], int]:
    """Tokenise each row's student prompt and completion (+ EOS); returns (examples, rows too long).

    With ``kd_top_k`` > 0 each example also gets the teacher's top-``kd_top_k`` tokens from the
    row's ``teacher_tokens`` / ``teacher_top_logprobs``, at the completion positions where the
    teacher's generated ids equal the student's completion ids (their common prefix). Later
    positions, and the EOS the student is trained to end with, get cross-entropy only.
    """
    examples, too_long = [], 0
    vocab_size = len(tokenizer)
    for row in rows:
        prompt = tokenizer(task.student_prompt(row.inputs)).input_ids
        answer = tokenizer(task.completion(row.output), add_special_tokens=False).input_ids
        completion = answer + [tokenizer.eos_token_id]
        if len(prompt) + len(completion) > max_length:
            too_long += 1
            continue
        teacher_top: tuple[TeacherTop | None, ...] = ()
        if kd_top_k:
            teacher_top = _teacher_targets(row, answer, kd_top_k, vocab_size) + (None,)
        examples.append(Example(prompt + completion, len(prompt), teacher_top))
    return examples, too_long


def _teacher_targets(row: Row, answer: list[int], k: int, vocab_size: int) -> tuple[TeacherTop | None, ...]:
    """The teacher's top-``k`` at each of ``answer``'s positions that its generated ids match."""
    tokens, tops = row.teacher_tokens, row.teacher_top_logprobs
    if tokens is None or tops is None:
        raise ValueError(
            f"row {row.id!r} has no teacher_top_logprobs, which train.kd_ratio > 0 needs: label the rows "
            "with the teacher's top-k (`stillhouse label` with train.kd_ratio set, then `stillhouse data curate`), "
            "or set train.kd_ratio: 0"
        )
    out_of_range = [i for i in tokens if not 0 <= i < vocab_size] + [
        i for top in tops for i, _ in top if not 0 <= i < vocab_size
    ]
    if out_of_range:
        raise ValueError(
            f"row {row.id!r}: the teacher's token ids (e.g. {out_of_range[0]}) are outside the student's "
            f"vocabulary of {vocab_size}: logit distillation needs a teacher with the student's tokenizer; "
            "set train.kd_ratio: 0 to distil from its text alone"
        )
    targets: list[TeacherTop | None] = [None] * len(answer)
    for position, (student_id, teacher_id, top) in enumerate(zip(answer, tokens, tops)):
        if student_id != teacher_id:
            break
        best = sorted(((int(i), float(v)) for i, v in top), key=lambda pair: -pair[1])[:k]
        if best:
            targets[position] = (tuple(i for i, _ in best), tuple(v for _, v in best))
    return tuple(targets)



def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of example indices for one epoch, a pure function of its arguments."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * _BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda index: lengths[index])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int, pack_width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels masked to completion tokens.

    Without ``pack_width`` every example has its own row. With it (sequence packing) the
    examples share rows of at most ``pack_width`` tokens, first fit by decreasing length; the
    batch then also carries ``position_ids`` restarting at each example and ``segments`` (the
    example's slot in its row, -1 on padding), from which :func:`packed_attention` keeps each
    token's attention inside its own example. Either way the loss sees the same tokens.

    With distillation targets, also ``kd_ids`` / ``kd_logprobs`` (``[rows, width, k]``, padded
    with id 0 and -inf) and ``kd_mask`` (``[rows, width]``), aligned with ``labels``.
    """
    rows = _pack(examples, pack_width) if pack_width else [[(example, 0)] for example in examples]
    width = max(offset + len(example.input_ids) for row in rows for example, offset in row)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for row, members in enumerate(rows):
        for slot, (example, offset) in enumerate(members):
            end = offset + len(example.input_ids)
            ids[row, offset:end] = torch.tensor(example.input_ids)
            labels[row, offset + example.prompt_length : end] = ids[row, offset + example.prompt_length : end]
            mask[row, offset:end] = 1
            positions[row, offset:end] = torch.arange(len(example.input_ids))
            segments[row, offset:end] = slot
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if pack_width:
        batch.update(position_ids=positions, segments=segments)
    k = max((len(top[0]) for example in examples for top in example.teacher_top if top), default=0)
    if k:
        kd_ids = torch.zeros((len(rows), width, k), dtype=torch.long)
        kd_logprobs = torch.full((len(rows), width, k), float("-inf"))
        kd_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for row, members in enumerate(rows):
            for example, offset in members:
                for index, top in enumerate(example.teacher_top):
                    if top:
                        position = offset + example.prompt_length + index
                        kd_ids[row, position, : len(top[0])] = torch.tensor(top[0])
                        kd_logprobs[row, position, : len(top[1])] = torch.tensor(top[1])
                        kd_mask[row, position] = True
        batch.update(kd_ids=kd_ids, kd_logprobs=kd_logprobs, kd_mask=kd_mask)
    return batch


def _pack(examples: list[Example], width: int) -> list[list[tuple[Example, int]]]:
    """Rows of (example, offset): each example, longest first, goes into the first row with room."""
    rows: list[list[tuple[Example, int]]] = []
    used: list[int] = []
    for example in sorted(examples, key=lambda example: -len(example.input_ids)):
        length = len(example.input_ids)
        row = next((index for index, taken in enumerate(used) if taken + length <= width), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append((example, used[row]))
        used[row] += length
    return rows


def packed_attention(segments: torch.Tensor, dtype: torch.dtype, sliding_window: int | None = None):
    """Additive ``[rows, 1, width, width]`` masks for packed rows: causal, within one example.

    Padding (segment -1) attends to padding only, so no softmax row is empty. When the model
    has local (sliding-window) layers narrower than the row, returns Gemma's mapping
    ``{"full_attention": ..., "sliding_attention": ...}`` with the window applied to the second.
    """
    width = segments.shape[1]
    index = torch.arange(width)
    allowed = (segments[:, :, None] == segments[:, None, :]) & (index[:, None] >= index[None, :])
    blocked = torch.finfo(dtype).min

    def additive(keep: torch.Tensor) -> torch.Tensor:
        return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, blocked)[:, None]

    if sliding_window is None or sliding_window >= width:
        return additive(allowed)
    local = allowed & (index[:, None] - index[None, :] < sliding_window)
    return {"full_attention": additive(allowed), "sliding_attention": additive(local)}



def micro_batch_stream(lengths: list[int], settings: TrainSettings, skip: int) -> Iterator[list[int]]:
    """Micro-batches of example indices across epochs forever, skipping the first ``skip`` (already trained on)."""
    epoch, seen = 0, 0
    while True:
        for batch in epoch_batches(lengths, settings.batch_size, settings.seed, epoch):
            if seen >= skip:
                yield batch
            seen += 1
        epoch += 1


def indices_for_steps(lengths: list[int], settings: TrainSettings, start: int, end: int) -> list[int]:
    """The example indices optimiser steps ``start`` to ``end`` train on, in order."""
    stream = micro_batch_stream(lengths, settings, start * settings.grad_accum)
    return [index for _ in range((end - start) * settings.grad_accum) for index in next(stream)]
