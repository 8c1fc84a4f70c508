"""The LoRAX native wire format (``POST /``, ``/generate``, ``/generate_stream``).

Field names, defaults and validation follow LoRAX's router (``router/src/lib.rs`` and
``validation.rs``) as lorax-client 0.6.3 reads them. Responses emit the superset that both
0.6.3 and newer clients accept (``skipped``, ``skipped_tokens``, non-null token logprobs).
"""

from __future__ import annotations

from typing import AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.engines.base import MAX_ALTERNATIVES, Event, GenerationResult, PrefillToken, SamplingParams, TokenEvent, TokenInfo
from serving.engines.constraint import ConstraintSpec
from serving.errors import ServingError


class MergedAdapters(BaseModel):
    ids: list[str]
    weights: list[float]
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] = "linear"
    density: float = 1.0
    majority_sign_method: Literal["total", "frequency"] = "total"


class ResponseFormat(BaseModel):
    """LoRAX ``response_format``: ``json_object`` (or ``json_schema``) with a JSON ``schema``, or ``text``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema_: dict | None = Field(default=None, alias="schema")

    @model_validator(mode="after")
    def _schema_fits_type(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema_ is None:
            raise ValueError("`json_schema` needs a `schema`; send type json_object for any JSON object")
        if self.type == "text" and self.json_schema_ is not None:
            raise ValueError("a `schema` needs type json_object")
        return self

    def constraint(self) -> ConstraintSpec | None:
        """The output constraint; none for ``text``; any JSON object when no schema is given."""
        if self.type == "text":
            return None
        return ConstraintSpec.json_schema(self.json_schema_, "parameters.response_format.schema")


class GenerateParameters(BaseModel):
    """LoRAX ``parameters``; unknown keys are refused so a misspelt parameter is not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = None
    adapter_source: str | None = None
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = None
    best_of: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    top_k: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    typical_p: float | None = Field(default=None, gt=0, lt=1)
    do_sample: bool = False
    max_new_tokens: int | None = Field(default=None, gt=0)
    ignore_eos_token: bool = False
    return_full_text: bool | None = False
    stop: list[str] = Field(default_factory=list)
    truncate: int | None = Field(default=None, gt=0)
    watermark: bool = False
    details: bool = True
    decoder_input_details: bool = False
    return_k_alternatives: int | None = None
    apply_chat_template: bool = False
    seed: int | None = Field(default=None, ge=0)
    response_format: ResponseFormat | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _none_is_empty(cls, value):
        return [] if value is None else value

    @model_validator(mode="after")
    def _supported(self) -> "GenerateParameters":
        unsupported = {
            "merged_adapters": (self.merged_adapters is not None, "register the merged adapter and name it in adapter_id"),
            "best_of": (self.best_of not in (None, 1), "send best_of=1 or leave it out"),
            "frequency_penalty": (bool(self.frequency_penalty), "use repetition_penalty"),
            "presence_penalty": (bool(self.presence_penalty), "use repetition_penalty"),
            "watermark": (self.watermark, "leave watermark false"),
            "return_k_alternatives": (
                self.return_k_alternatives is not None and not 0 <= self.return_k_alternatives <= MAX_ALTERNATIVES,
                f"send an integer from 1 to {MAX_ALTERNATIVES} (given {self.return_k_alternatives}), or leave it out",
            ),
            "adapter_source": (
                self.adapter_source not in (None, "hub", "local"),
                "adapters come from the server's registry: leave adapter_source out",
            ),
        }
        problems = [f"`{name}` is not supported by this server; {fix}" for name, (bad, fix) in unsupported.items() if bad]
        if problems:
            raise ValueError("; ".join(problems))
        return self


    def constraint(self) -> ConstraintSpec | None:
        """The output constraint ``response_format`` asks for, if any."""
        return self.response_format.constraint() if self.response_format else None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False

    @field_validator("inputs")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("`inputs` cannot be empty")
        return value


def sampling_params(parameters: GenerateParameters, max_new_tokens: int) -> SamplingParams:
    """Engine parameters for a validated LoRAX request."""
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        do_sample=parameters.do_sample,
        temperature=parameters.temperature,
        top_k=parameters.top_k,
        top_p=parameters.top_p,
        typical_p=parameters.typical_p,
        repetition_penalty=parameters.repetition_penalty,
        seed=parameters.seed,
        stop=tuple(parameters.stop),
        ignore_eos_token=parameters.ignore_eos_token,
        prefill_logprobs=parameters.decoder_input_details,
        alternatives=parameters.return_k_alternatives or None,
    )


def token_json(token: TokenInfo) -> dict:
    body = {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special, "skipped": False}
    if token.alternatives is not None:  # LoRAX omits the key when none were asked for
        body["alternative_tokens"] = [{"id": a.id, "text": a.text, "logprob": a.logprob} for a in token.alternatives]
    return body


def prefill_json(token: PrefillToken) -> dict:
    return {"id": token.id, "text": token.text, "logprob": token.logprob}


def generate_response(result: GenerationResult, parameters: GenerateParameters, prompt: str) -> dict:
    """A ``GenerateResponse`` body."""
    text = prompt + result.generated_text if parameters.return_full_text else result.generated_text
    body: dict = {"generated_text": text}
    if parameters.details:
        body["details"] = {
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "generated_tokens": result.generated_tokens,
            "skipped_tokens": 0,
            "seed": result.seed,
            "prefill": [prefill_json(t) for t in result.prefill],
            "tokens": [token_json(t) for t in result.tokens],
        }
    return body


def stream_event(token: TokenInfo, result: GenerationResult | None, parameters: GenerateParameters, prompt: str) -> dict:
    """One ``StreamResponse``; the last one carries the full text and ``StreamDetails``."""
    event: dict = {"token": token_json(token), "generated_text": None, "details": None}
    if result is not None:
        text = prompt + result.generated_text if parameters.return_full_text else result.generated_text
        event["generated_text"] = text
        if parameters.details:
            event["details"] = {
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "generated_tokens": result.generated_tokens,
                "seed": result.seed,
            }
    return event


async def stream_events(events: AsyncIterator[Event], parameters: GenerateParameters, prompt: str) -> AsyncIterator[dict]:
    """The ``StreamResponse`` events for the engine's events; an engine error ends them with an error event.

    The last token travels with the final text, so each token waits for the next engine event.
    """
    pending: TokenEvent | None = None
    try:
        async for event in events:
            if isinstance(event, GenerationResult):
                if pending is not None:
                    yield stream_event(pending.token, event, parameters, prompt)
                return
            if pending is not None:
                yield stream_event(pending.token, None, parameters, prompt)
            pending = event
    except ServingError as error:
        yield error.body()


def timing_headers(model_name: str, adapter_id: str, result: GenerationResult, total_s: float) -> dict[str, str]:
    """LoRAX's response headers (times in ms), which the A/B router reads per arm."""
    per_token = (result.total_time_s - result.time_to_first_token_s) / max(result.generated_tokens - 1, 1)
    return {
        "x-model-id": model_name,
        "x-adapter-id": adapter_id,
        "x-prompt-tokens": str(result.prompt_tokens),
        "x-generated-tokens": str(result.generated_tokens),
        "x-total-tokens": str(result.prompt_tokens + result.generated_tokens),
        "x-queue-time": str(round(result.queue_time_s * 1000)),
        "x-inference-time": str(round((result.total_time_s - result.queue_time_s) * 1000)),
        "x-time-to-first-token": str(round(result.time_to_first_token_s * 1000)),
        "x-time-per-output-token": str(round(per_token * 1000)),
        "x-total-time": str(round(total_s * 1000)),
    }
