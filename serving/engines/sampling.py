"""Choosing the next token from a sequence's logits: pure functions with HF/TGI semantics.

Each processor takes the logits of one sequence (shape ``[vocab]``) and returns new logits;
removed tokens get ``-inf``. Randomness comes only from the ``torch.Generator`` passed to
``choose_token``, so a seed reproduces a sampled sequence exactly. Rows that need no
processor at all (plain greedy) are chosen together by ``choose_greedy``: one argmax and one
log-softmax over the whole batch instead of a pass over the vocabulary per row.
"""

from __future__ import annotations

import torch

from serving.engines.base import SamplingParams

FILTERED = float("-inf")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Discourage tokens marked in the boolean mask ``seen`` (prompt and generated so far).

    As in HF's ``RepetitionPenaltyLogitsProcessor``: positive logits are divided by the
    penalty, negative ones multiplied, so a penalty above 1 always lowers the score.
    """
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sharpen (< 1) or flatten (> 1) the distribution."""
    return logits / temperature


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest logits (and any tied with the k-th)."""
    k = min(k, logits.shape[-1])
    kth_value = torch.topk(logits, k).values[..., -1, None]
    return logits.masked_fill(logits < kth_value, FILTERED)


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus)."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - top_p)
    sorted_remove[..., -1:] = False  # the most likely token always survives
    remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
    return logits.masked_fill(remove, FILTERED)


def filter_typical(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy,
    up to probability ``mass`` (HF's ``TypicalLogitsWarper``)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    entropy = -(log_probs * probs).nansum(-1, keepdim=True)
    distance = (-log_probs - entropy).abs()
    sorted_distance, sorted_indices = torch.sort(distance, descending=False)
    cumulative = logits.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    sorted_remove = sorted_distance > sorted_distance.gather(-1, last)
    sorted_remove[..., :1] = False  # the most typical token always survives
    remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
    return logits.masked_fill(remove, FILTERED)


def process(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """All processors the parameters ask for, in HF/TGI order.

    The repetition penalty applies to greedy decoding too; temperature and the filters
    only when sampling.
    """
    if params.repetition_penalty is not None and params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if not params.sampling:
        return logits
    if params.temperature is not None and params.temperature != 1.0:
        logits = apply_temperature(logits, params.temperature)
    if params.top_k is not None and params.top_k > 0:
        logits = filter_top_k(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        logits = filter_top_p(logits, params.top_p)
    if params.typical_p is not None and params.typical_p < 1.0:
        logits = filter_typical(logits, params.typical_p)
    return logits


def is_plain_greedy(params: SamplingParams) -> bool:
    """Whether the next token is the bare argmax: no sampling, no repetition penalty, no alternatives."""
    penalty = params.repetition_penalty is not None and params.repetition_penalty != 1.0
    return not params.sampling and not penalty and not params.alternatives


def choose_greedy(logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """The argmax token of every row of ``logits [rows, vocab]`` and its log-probability, in one pass.

    Row for row the same ids and values as ``choose_token`` on plain greedy parameters: argmax
    and log-softmax reduce each row on its own, whatever the number of rows.
    """
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1)
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens.tolist(), log_probs.tolist()


def choose_token(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[int, float]:
    """The next token id and its log-probability under the processed distribution.

    Greedy (argmax) unless ``params.sampling``; sampling draws from ``generator`` only.
    """
    token, logprob, _ = choose_token_with_alternatives(logits, params, seen, generator, 0)
    return token, logprob


def choose_token_with_alternatives(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None,
    generator: torch.Generator | None,
    k: int,
) -> tuple[int, float, list[tuple[int, float]]]:
    """``choose_token`` plus the ``k`` most likely ``(id, logprob)`` pairs, best first.

    The alternatives come from the very distribution the chosen token's log-probability is
    read from, so the chosen token, when among them, carries the same value. Tokens a
    sampling filter removed (log-probability -inf) are never alternatives.
    """
    processed = process(logits.float(), params, seen)
    log_probs = torch.log_softmax(processed, dim=-1)
    if params.sampling:
        token = int(torch.multinomial(log_probs.exp(), 1, generator=generator))
    else:
        token = int(torch.argmax(processed))
    alternatives: list[tuple[int, float]] = []
    if k > 0:
        values, ids = torch.topk(log_probs, min(k, log_probs.shape[-1]))
        alternatives = [(i, v) for i, v in zip(ids.tolist(), values.tolist()) if v != FILTERED]
    return token, float(log_probs[token]), alternatives
