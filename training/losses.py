"""Distillation losses over completion tokens (one function per loss, as torchtune's ``kd_losses``).

- :func:`completion_loss`: cross-entropy on completion tokens only, with the LM head run only at
  those positions: with Gemma 3's 262k vocabulary the head dominates the cost, and prompt
  positions need no logits. With ``kd_ratio`` r > 0, positions where the teacher's top-k is known
  train on ``(1 - r) * CE + r * top_k_kl``.
- :func:`top_k_kl`: forward KL(teacher ‖ student) over the teacher's top-k tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.batching import IGNORE, packed_attention


def top_k_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Forward KL(teacher ‖ student) per position, over the teacher's top-k tokens.

    ``student_logits`` is ``[n, vocab]``; ``teacher_ids`` / ``teacher_logprobs`` are ``[n, k]``
    (padding has logprob -inf). The teacher's probabilities are renormalised over its top-k, p;
    the student's are its full-vocabulary log-softmax gathered at those ids, log q. The term is
    ``sum_i p_i (log p_i - log q_i)``: the KL restricted to the teacher's support, without
    renormalising the student, so mass the student puts outside the teacher's top-k is pushed
    down too. It is >= 0, and 0 exactly when the student's distribution is the renormalised
    teacher's (all its mass on the teacher's top-k).
    """
    teacher_log = torch.log_softmax(teacher_logprobs.float(), dim=-1)
    teacher = teacher_log.exp()
    student_log = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_ids)
    terms = torch.where(teacher > 0, teacher * (teacher_log - student_log), torch.zeros_like(teacher))
    return terms.sum(dim=-1)


def completion_loss(model, batch: dict[str, torch.Tensor], kd_ratio: float = 0.0) -> tuple[torch.Tensor, int]:
    """Summed loss over completion tokens, with logits computed at those positions only.

    Cross-entropy against the completion ids; with ``kd_ratio`` r > 0, each position that has
    the teacher's top-k (``kd_mask``) is trained on ``(1 - r) * CE + r * top_k_kl`` instead, and
    the others on CE alone. The sum is normalised by the caller, per completion token.
    Returns (summed loss, completion tokens).
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "segments" in batch:  # packed rows: attention stays inside each example
        dtype = causal_lm.get_output_embeddings().weight.dtype
        window = getattr(causal_lm.config, "sliding_window", None)
        inputs.update(position_ids=batch["position_ids"], attention_mask=packed_attention(batch["segments"], dtype, window))
    hidden = causal_lm.get_decoder()(**inputs).last_hidden_state
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][selected]).float()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    count = int(selected.sum())
    if not kd_ratio or "kd_mask" not in batch:
        return F.cross_entropy(logits, targets[selected], reduction="sum"), count
    cross_entropy = F.cross_entropy(logits, targets[selected], reduction="none")
    distilled = batch["kd_mask"][:, 1:][selected]
    kl = top_k_kl(logits[distilled], batch["kd_ids"][:, 1:][selected][distilled], batch["kd_logprobs"][:, 1:][selected][distilled])
    loss = cross_entropy[~distilled].sum() + ((1 - kd_ratio) * cross_entropy[distilled] + kd_ratio * kl).sum()
    return loss, count

