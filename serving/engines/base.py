"""The small interface every inference engine implements (torch in-process, vLLM, ...).

The server speaks the wire protocols and owns the registry; an engine only turns a
tokenized request plus an optional resident adapter into a stream of tokens. Keeping this
interface small is what lets the router, metrics and clients stay unchanged when the
engine changes.
"""

from __future__ import annotations

import abc
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Literal

from serving.errors import ValidationError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from serving.engines.constraint import Constraint
    from serving.engines.model_text import ModelText

FinishReason = Literal["length", "eos_token", "stop_sequence"]

#: prompt + generated tokens allowed when neither the caller nor a shorter model limit says otherwise
DEFAULT_MAX_TOTAL_TOKENS = 8192

#: the most alternatives a request may ask for per generated token (LoRAX
#: ``return_k_alternatives``, OpenAI ``logprobs``); vLLM's default ``max_logprobs``
MAX_ALTERNATIVES = 20


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters, already validated by the server (LoRAX semantics).

    Sampling is used when ``do_sample`` is true or any warper is set (temperature other
    than 1, top_k, top_p < 1, typical_p < 1), as in LoRAX/TGI; ``temperature == 0``
    means greedy.
    """

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos_token: bool = False
    # Log-probabilities of the prompt tokens (LoRAX ``decoder_input_details``).
    prefill_logprobs: bool = False
    # The k most likely tokens at each generated position (LoRAX ``return_k_alternatives``,
    # OpenAI ``logprobs``); None asks for none, 0 for an empty list per token.
    alternatives: int | None = None

    @property
    def sampling(self) -> bool:
        if self.temperature == 0:
            return False
        warpers = (
            (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k > 0)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )
        return self.do_sample or warpers


def resolve_seed(params: SamplingParams) -> int | None:
    """The seed a generation runs with: the request's, a fresh random one when sampling without one, None when greedy.

    Results report it, so a sampled answer can be reproduced by sending the seed back.
    """
    if not params.sampling:
        return None
    return params.seed if params.seed is not None else secrets.randbits(63)


def max_total_tokens_for(config: PretrainedConfig, requested: int | None) -> int:
    """The prompt + generated token limit: ``requested``, else the model's context capped at the default."""
    return requested or min(getattr(config, "max_position_embeddings", DEFAULT_MAX_TOTAL_TOKENS), DEFAULT_MAX_TOTAL_TOKENS)


@dataclass(frozen=True)
class AdapterRef:
    """A registry adapter the engine should apply: its canonical id and local directory."""

    adapter_id: str  # canonical "name@vN"
    path: Path


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None = None  # None = the base model
    constraint: Constraint | None = None  # structured output: the grammar the generated text must follow


@dataclass(frozen=True)
class Alternative:
    """One of the most likely tokens at a generated position.

    ``logprob`` comes from the same distribution as the chosen token's (after the repetition
    penalty and, when sampling, temperature and filters); ``text`` is the token on its own.
    """

    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str  # this token's share of the decoded text (may be "" mid UTF-8 sequence)
    logprob: float
    special: bool
    # the most likely tokens, best first, when the request asked for them (else None)
    alternatives: tuple[Alternative, ...] | None = None


@dataclass(frozen=True)
class PrefillToken:
    id: int
    text: str
    logprob: float | None  # None for the first token, which has no context


@dataclass
class GenerationResult:
    """The final event of a generation."""

    generated_text: str
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None
    tokens: list[TokenInfo] = field(default_factory=list)
    prefill: list[PrefillToken] = field(default_factory=list)
    queue_time_s: float = 0.0
    time_to_first_token_s: float = 0.0
    total_time_s: float = 0.0


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, yielded as soon as it exists."""

    token: TokenInfo


Event = TokenEvent | GenerationResult


class Engine(abc.ABC):
    """A model plus any number of resident LoRA adapters, generating concurrently."""

    #: name clients use for the base model (OpenAI ``model``, LoRAX ``model_id``)
    model_name: str
    #: prompt tokens + max_new_tokens must not exceed this
    max_total_tokens: int
    #: the base model's tokenizer, end-of-sequence ids and chat template
    text: ModelText

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and start the generation loop."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Finish or cancel in-flight requests and release resources."""

    # Every engine tokenizes with the same ``ModelText``, so a request gives the same ids
    # and the same text whichever engine runs it.
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text`` (with BOS when the model uses one)."""
        return self.text.tokenize(text, add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        """Text for ``ids``, special tokens skipped."""
        return self.text.decode(ids)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt for a chat; a plain ``role: content`` fallback when the model has no template."""
        return self.text.apply_chat_template(messages)

    def check_length(self, request: GenerationRequest) -> None:
        """Raise ``ValidationError`` for an empty prompt or one that leaves no room for ``max_new_tokens``."""
        if not request.prompt_ids:
            raise ValidationError("the prompt is empty")
        if len(request.prompt_ids) + request.params.max_new_tokens > self.max_total_tokens:
            raise ValidationError(
                f"prompt tokens ({len(request.prompt_ids)}) + max_new_tokens ({request.params.max_new_tokens}) "
                f"must be <= {self.max_total_tokens}"
            )

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Yield a ``TokenEvent`` per token, then exactly one ``GenerationResult``.

        Raises ``serving.errors.OverloadedError`` (before yielding anything) when the
        bounded queue is full. Loads ``request.adapter`` if it is not resident yet.
        """

    @abc.abstractmethod
    async def load_adapter(self, adapter: AdapterRef) -> float:
        """Make an adapter resident; returns the load time in seconds (0 if already resident)."""

    @abc.abstractmethod
    async def pin_adapter(self, adapter: AdapterRef) -> float:
        """Make an adapter resident and keep it in an active slot until the engine stops (never evicted);
        returns the load time in seconds."""

    @abc.abstractmethod
    async def unload_adapter(self, adapter_id: str) -> bool:
        """Drop a resident adapter; returns whether it was resident."""

    @abc.abstractmethod
    def resident_adapters(self) -> list[str]:
        """Canonical ids of the adapters resident now."""

    @abc.abstractmethod
    def queue_depth(self) -> int:
        """Requests waiting or running now."""
