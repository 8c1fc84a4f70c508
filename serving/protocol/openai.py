"""The OpenAI wire format (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``).

``model`` names a registry adapter id, or the base model (its name or ``""``), as in LoRAX
and vLLM. Defaults follow OpenAI: ``temperature`` 1 (sampling), ``top_p`` 1; completions
default to 16 new tokens. Stop sequences are not part of the returned text.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
import json
from typing import Annotated, AsyncIterator, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from serving.engines.base import MAX_ALTERNATIVES, Event, GenerationResult, SamplingParams
from serving.engines.constraint import ConstraintSpec
from serving.errors import ServingError

FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}

#: the request fields that constrain the output; a request may send one
_CONSTRAINT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "structured_outputs")


def _parse_json_text(value):
    """vLLM accepts a JSON schema as an object or as JSON text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as error:
        raise ValueError(f"not valid JSON ({error}); send a JSON schema object") from error


_Schema = Annotated[dict, BeforeValidator(_parse_json_text)]
_Regex = Annotated[str, Field(min_length=1)]
_Choices = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


class JsonSchema(BaseModel):
    """OpenAI ``response_format.json_schema``; ``strict`` is accepted: the schema is always enforced."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    name: str
    description: str | None = None
    json_schema: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI ``response_format``: ``text``, ``json_object`` (any JSON object) or ``json_schema``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_fits_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("send `json_schema` exactly when type is json_schema")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: exactly one of ``json``, ``regex``, ``choice``, ``json_object``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    json_: _Schema | None = Field(default=None, alias="json")
    regex: _Regex | None = None
    choice: _Choices | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> "StructuredOutputs":
        fields = {"json": self.json_, "regex": self.regex, "choice": self.choice, "json_object": self.json_object}
        given = [name for name, value in fields.items() if value is not None]
        if len(given) != 1:
            raise ValueError(f"send exactly one of json, regex, choice, json_object (given: {', '.join(given) or 'none'})")
        return self


class _Common(BaseModel):
    """Fields both endpoints share; unknown keys are refused as OpenAI does."""

    model_config = ConfigDict(extra="forbid")

    model: str = ""
    stream: bool = False
    stream_options: dict | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None
    # Extensions LoRAX and vLLM accept as well.
    top_k: int | None = Field(default=None, gt=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos_token: bool = False
    # Structured output: OpenAI's, and vLLM's older (guided_*) and newer (structured_outputs) fields.
    response_format: ResponseFormat | None = None
    guided_json: _Schema | None = None
    guided_regex: _Regex | None = None
    guided_choice: _Choices | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _supported(self):
        constraints = [name for name in _CONSTRAINT_FIELDS if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            constraints.remove("response_format")
        if len(constraints) > 1:
            raise ValueError(f"send at most one of {', '.join(_CONSTRAINT_FIELDS)} (given: {', '.join(constraints)})")
        unsupported = {
            "n": (self.n != 1, "send n=1 and repeat the request"),
            "frequency_penalty": (bool(self.frequency_penalty), "use repetition_penalty"),
            "presence_penalty": (bool(self.presence_penalty), "use repetition_penalty"),
            "logit_bias": (bool(self.logit_bias), "leave it out"),
            **self._unsupported_extra(),
        }
        problems = [f"`{name}` is not supported by this server; {fix}" for name, (bad, fix) in unsupported.items() if bad]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _unsupported_extra(self) -> dict:
        return {}

    def constraint(self) -> ConstraintSpec | None:
        """The output constraint the request asks for, if any (compiled, and checked, by the service)."""
        if self.guided_json is not None:
            return ConstraintSpec.json_schema(self.guided_json, "guided_json")
        if self.guided_regex is not None:
            return ConstraintSpec.regex(self.guided_regex, "guided_regex")
        if self.guided_choice is not None:
            return ConstraintSpec.choice(self.guided_choice, "guided_choice")
        outputs = self.structured_outputs
        if outputs is not None:
            if outputs.json_ is not None:
                return ConstraintSpec.json_schema(outputs.json_, "structured_outputs.json")
            if outputs.regex is not None:
                return ConstraintSpec.regex(outputs.regex, "structured_outputs.regex")
            if outputs.choice is not None:
                return ConstraintSpec.choice(outputs.choice, "structured_outputs.choice")
            return ConstraintSpec.json_schema(None, "structured_outputs.json_object") if outputs.json_object else None
        response_format = self.response_format
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return ConstraintSpec.json_schema(None, "response_format")
        return ConstraintSpec.json_schema(response_format.json_schema.json_schema, "response_format.json_schema.schema")

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def answer_text(self, result: GenerationResult) -> str:
        """The generated text as OpenAI answers it: cut before the stop sequence."""
        return strip_stop(result.generated_text, result, self.stop_sequences())

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop_sequences(),
            ignore_eos_token=self.ignore_eos_token,
        )


class CompletionRequest(_Common):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, gt=0)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    # vLLM's extension: name tokens "token_id:<id>" in ``logprobs`` (token texts can collide).
    return_tokens_as_token_ids: bool = False

    def _unsupported_extra(self) -> dict:
        return {
            "prompt": (
                isinstance(self.prompt, list) and len(self.prompt) != 1,
                "send one prompt string per request",
            ),
            "logprobs": (
                self.logprobs is not None and not 0 <= self.logprobs <= MAX_ALTERNATIVES,
                f"send an integer from 0 to {MAX_ALTERNATIVES} (given {self.logprobs}), or leave it out",
            ),
            "logprobs with stream": (
                self.logprobs is not None and self.stream,
                "send stream=false to get logprobs, or leave logprobs out",
            ),
            "logprobs with echo": (
                self.logprobs is not None and self.echo,
                "send echo=false to get logprobs (prompt logprobs come from the LoRAX API's decoder_input_details)",
            ),
            "best_of": (self.best_of not in (None, 1), "leave it out"),
            "suffix": (self.suffix is not None, "leave it out"),
        }

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        return dataclasses.replace(super().sampling_params(max_new_tokens), alternatives=self.logprobs)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]
    name: str | None = None

    def text(self) -> str:
        """Content as plain text; a list of parts may hold only text parts."""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("message content parts must be {'type': 'text', 'text': ...}; images are not supported")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None

    def _unsupported_extra(self) -> dict:
        return {
            "logprobs": (
                self.logprobs or bool(self.top_logprobs),
                "leave it out; /v1/completions `logprobs` and the LoRAX API return per-token logprobs",
            ),
            "tools": (bool(self.tools), "leave it out"),
            "tool_choice": (self.tool_choice not in (None, "none"), "leave it out"),
        }

    def message_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def strip_stop(text: str, result: GenerationResult, stop: tuple[str, ...]) -> str:
    """OpenAI cuts the text before the first stop sequence; LoRAX keeps it (and any rest of its last token)."""
    if result.finish_reason != "stop_sequence":
        return text
    return text[: first_stop_index(text, stop)]


def first_stop_index(text: str, stop: tuple[str, ...]) -> int:
    """Where the earliest stop sequence starts in ``text`` (``len(text)`` if none does)."""
    found = [text.find(sequence) for sequence in stop if sequence and sequence in text]
    return min(found, default=len(text))


def usage(result: GenerationResult) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.generated_tokens,
        "total_tokens": result.prompt_tokens + result.generated_tokens,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def completion_response(
    request_id: str, model: str, text: str, result: GenerationResult, request: CompletionRequest | None = None
) -> dict:
    logprobs = None
    if request is not None and request.logprobs is not None:
        logprobs = completion_logprobs(result, request.return_tokens_as_token_ids)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": FINISH_REASONS[result.finish_reason]}],
        "usage": usage(result),
    }


def completion_logprobs(result: GenerationResult, tokens_as_ids: bool) -> dict:
    """Legacy completions ``logprobs``: each generated token, its logprob, the top alternatives, offsets.

    As OpenAI and vLLM do, ``top_logprobs[i]`` holds the requested most likely tokens, best first,
    plus the chosen token when it is not among them. Tokens are named by their text, or
    ``token_id:<id>`` with ``tokens_as_ids``; the first of two alternatives with the same
    text wins. Every generated token is listed, including any cut from ``text`` by a stop sequence.
    """
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    offset = 0
    for token in result.tokens:
        name = f"token_id:{token.id}" if tokens_as_ids else token.text
        top: dict[str, float] = {}
        for alternative in token.alternatives or ():
            key = name if alternative.id == token.id else (
                f"token_id:{alternative.id}" if tokens_as_ids else alternative.text
            )
            top.setdefault(key, alternative.logprob)
        top.setdefault(name, token.logprob)
        tokens.append(name)
        token_logprobs.append(token.logprob)
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(token.text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}


def completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def chat_response(request_id: str, model: str, text: str, result: GenerationResult) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": FINISH_REASONS[result.finish_reason],
            }
        ],
        "usage": usage(result),
    }


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(request_id: str, model: str, object_name: str, result: GenerationResult) -> dict:
    return {
        "id": request_id,
        "object": object_name,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(result),
    }


class StopTextStream:
    """Streams text while holding back any tail that could still become a stop sequence.

    OpenAI clients never see the stop sequence, so a streamed chunk must not contain the
    start of one until it is clear that the sequence does not complete.
    """

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.text = ""
        self.emitted = 0

    def push(self, piece: str) -> str:
        """Add generated text; return what is now safe to send."""
        self.text += piece
        safe = min(len(self.text) - self._held_back(), first_stop_index(self.text, self.stop))
        chunk = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return chunk

    def finish(self, final_text: str) -> str:
        """The rest of ``final_text`` (stop sequence already removed) not sent yet."""
        return final_text[self.emitted :]

    def _held_back(self) -> int:
        longest = 0
        for sequence in self.stop:
            for size in range(min(len(sequence), len(self.text)), 0, -1):
                if self.text.endswith(sequence[:size]):
                    longest = max(longest, size)
                    break
        return longest


async def stream_chunks(
    events: AsyncIterator[Event], body: CompletionRequest | ChatCompletionRequest, request_id: str, model: str, prompt: str
) -> AsyncIterator[dict | str]:
    """The streamed chunks for the engine's events, then ``[DONE]``; an engine error ends them with an error event.

    Chat opens with the assistant role; completions echo the prompt when asked. Stop sequences
    are held back (``StopTextStream``) and never sent.
    """
    chat = isinstance(body, ChatCompletionRequest)
    held = StopTextStream(body.stop_sequences())

    def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            return chat_chunk(request_id, model, delta, finish)
        return completion_chunk(request_id, model, text or "", finish)

    try:
        if chat:
            yield chunk(None, None, role=True)
        elif body.echo:
            yield chunk(prompt, None)
        async for event in events:
            if isinstance(event, GenerationResult):
                rest = held.finish(body.answer_text(event))
                if rest:
                    yield chunk(rest, None)
                yield chunk(None if chat else "", FINISH_REASONS[event.finish_reason])
                if body.include_usage_in_stream():
                    yield usage_chunk(request_id, model, "chat.completion.chunk" if chat else "text_completion", event)
                break
            piece = held.push(event.token.text)
            if piece:
                yield chunk(piece, None)
        yield "[DONE]"
    except ServingError as error:
        yield error.body()
