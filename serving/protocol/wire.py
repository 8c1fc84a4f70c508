"""What every wire model shares: unknown keys refused, JSON text and numbers the engines can use.

A request is refused at the edge, naming the field, rather than failing inside the engine: no
lone surrogates in any text, no ``NaN``/``Infinity`` numbers, and sampling values whose
arithmetic stays finite (a temperature or repetition penalty near 0 turns every logit into
``inf`` and the log-probabilities into ``NaN``; a seed must fit the generator's 64 bits).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from serving.surrogates import has_surrogates

MIN_TEMPERATURE = 0.01  # vLLM's floor too; 0 itself means greedy decoding
MIN_REPETITION_PENALTY = 0.01
MAX_SEED = 2**64 - 1  # LoRAX's u64, and what torch.Generator.manual_seed accepts


def _temperature(value: float) -> float:
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy decoding) or at least {MIN_TEMPERATURE} (given {value}); smaller values overflow the logits")
    return value


Temperature = Annotated[float, Field(ge=0), AfterValidator(_temperature)]
RepetitionPenalty = Annotated[float, Field(ge=MIN_REPETITION_PENALTY)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def _holds_surrogates(value) -> bool:
    if isinstance(value, str):
        return has_surrogates(value)
    if isinstance(value, dict):
        return any(_holds_surrogates(k) or _holds_surrogates(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_holds_surrogates(v) for v in value)
    return False


class WireModel(BaseModel):
    """A request body (or part of one): unknown keys, non-finite numbers and lone surrogates are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value):
        if _holds_surrogates(value):
            raise ValueError("holds a lone UTF-16 surrogate (such as \\ud800), which is not text; send valid Unicode")
        return value
