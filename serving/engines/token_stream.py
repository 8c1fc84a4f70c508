"""The tokens a generation has produced, the text they make, and the rules that end it.

Both engines pass every generated token through a ``TokenStream``, so a request stops at the
same token, with the same finish reason and the same text pieces, whichever engine runs it.
"""

from __future__ import annotations

import time

from serving.engines.base import (
    Alternative,
    FinishReason,
    GenerationResult,
    PrefillToken,
    SamplingParams,
    TokenInfo,
)
from serving.engines.detokenizer import IncrementalDetokenizer
from serving.engines.model_text import ModelText


def finish_reason(
    params: SamplingParams, eos_token_ids: frozenset[int], token_id: int, generated: int, text: str, piece: str
) -> FinishReason | None:
    """Why a generation ends with ``token_id``, its ``generated``-th token, or None if it goes on.

    ``text`` is the generated text so far, ending with ``piece``, the text this token completed.
    """
    if not params.ignore_eos_token and token_id in eos_token_ids:
        return "eos_token"
    if piece and params.stop:
        # only a match that ends in the new text is new
        window = text[-(len(piece) + max(map(len, params.stop)) - 1) :]
        if any(stop in window for stop in params.stop):
            return "stop_sequence"
    if generated >= params.max_new_tokens:
        return "length"
    return None


class TokenStream:
    """One generation's tokens as they are chosen: their text pieces, when to stop, and the final result."""

    def __init__(self, model_text: ModelText, params: SamplingParams, eos_token_ids: frozenset[int]):
        self._model_text = model_text
        self._params = params
        self._eos_token_ids = eos_token_ids
        self._detokenizer = IncrementalDetokenizer(model_text.decode)
        self.ids: list[int] = []
        self.tokens: list[TokenInfo] = []
        self.text = ""
        #: set by the token that ends the generation
        self.finish_reason: FinishReason | None = None
        self.first_token_at = 0.0

    def push(
        self,
        token_id: int,
        logprob: float,
        alternatives: tuple[Alternative, ...] | None = None,
        upstream_finish: FinishReason | None = None,
    ) -> TokenInfo:
        """Add the next token and return it with the text it completes.

        ``upstream_finish`` is the reason the producer gives for ending here, used when none of
        our rules ends the generation first. The last token also carries any text still held back.
        """
        self.ids.append(token_id)
        piece = self._detokenizer.push(token_id)
        self.text += piece
        finish = finish_reason(self._params, self._eos_token_ids, token_id, len(self.ids), self.text, piece)
        finish = finish or upstream_finish
        if finish is not None:
            tail = self._detokenizer.flush()
            piece += tail
            self.text += tail
        token = TokenInfo(
            id=token_id,
            text=piece,
            logprob=logprob,
            special=token_id in self._model_text.special_ids,
            alternatives=alternatives,
        )
        self.tokens.append(token)
        self.finish_reason = finish
        self.first_token_at = self.first_token_at or time.perf_counter()
        return token

    def result(
        self,
        *,
        prompt_tokens: int,
        seed: int | None,
        prefill: list[PrefillToken],
        enqueued_at: float,
        admitted_at: float | None = None,
    ) -> GenerationResult:
        """The final event, timed from ``enqueued_at`` (queue time up to ``admitted_at`` when known)."""
        now = time.perf_counter()
        return GenerationResult(
            generated_text=self._model_text.decode(self.ids),
            finish_reason=self.finish_reason,
            prompt_tokens=prompt_tokens,
            generated_tokens=len(self.ids),
            seed=seed,
            tokens=list(self.tokens),
            prefill=prefill,
            queue_time_s=admitted_at - enqueued_at if admitted_at is not None else 0.0,
            time_to_first_token_s=(self.first_token_at or now) - enqueued_at,
            total_time_s=now - enqueued_at,
        )
