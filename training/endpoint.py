"""Endpoints: ask any LoRAX-protocol (lorax-client) or OpenAI-protocol (openai client) server.

Our server, LoRAX, vLLM and hosted APIs all answer through one of these two clients. Calls are
retried with exponential back-off on transient failures (overload, rate limits, timeouts,
connection errors); requests the server rejects as invalid are not retried.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from training.config import EndpointConfig
from training.task import Generation

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Completion:
    """One answer: its text, the prompt's token count as the server reported it, and latency.

    When the server reports them: the generated token ids, the summed log-probability of the
    generated tokens (``logprob``), and, when asked for, each generated token's ``top_k`` most
    likely tokens as ``{token_id: logprob}``, best first.
    """

    text: str
    prompt_tokens: int
    latency_s: float
    token_ids: tuple[int, ...] = ()
    logprob: float | None = None
    top_logprobs: tuple[dict[int, float], ...] | None = None


class EndpointError(RuntimeError):
    """A request failed for good (after retries, or rejected as invalid)."""


class Endpoint:
    """A client for one endpoint and adapter (``config.model``; empty means the base model)."""

    def __init__(self, config: EndpointConfig):
        self.config = config
        if config.protocol == "lorax":
            import lorax

            self._lorax = lorax.Client(config.url, timeout=int(config.timeout_s), max_session_retries=0)
            # lorax-client's sessions retry with urllib3 back-off for about a minute per call (and
            # rebuild such a session after any connection error), hiding failures from complete();
            # give it plain sessions and leave retrying to us.
            self._lorax._create_session = lambda: setattr(self._lorax, "session", _plain_session(config.concurrency))
        else:
            import openai

            api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else "unused"
            # The client's own retries would hide failures from our back-off; ours are explicit.
            self._openai = openai.OpenAI(base_url=config.url, api_key=api_key or "unused", timeout=config.timeout_s, max_retries=0)

    @property
    def identity(self) -> str:
        """``protocol:url#model``: what lineage and caches record as the model that answered."""
        return f"{self.config.protocol}:{self.config.url}#{self.config.model or ''}"

    def complete(self, prompt: str, generation: Generation, top_k: int = 0, constraint: dict | None = None) -> Completion:
        """The endpoint's completion of ``prompt``, retried on transient failures.

        ``top_k`` > 0 also asks for the ``top_k`` most likely tokens at each generated position
        (LoRAX ``return_k_alternatives``; OpenAI ``logprobs`` with vLLM's
        ``return_tokens_as_token_ids``, so that tokens come back as ids). ``constraint`` holds
        extra request fields that constrain the answer (LoRAX ``response_format``; OpenAI
        ``guided_choice`` / ``guided_regex`` / ``response_format``).
        """
        attempts = self.config.retries + 1
        for attempt in range(attempts):
            started = time.perf_counter()
            try:
                answer = self._call(prompt, generation, top_k, constraint or {})
                return dataclasses.replace(answer, latency_s=time.perf_counter() - started)
            except Exception as error:  # noqa: BLE001 - classified below, re-raised when permanent
                if _is_permanent(error) or attempt == attempts - 1:
                    raise EndpointError(f"{self.identity}: {type(error).__name__}: {error}") from error
                time.sleep(min(8.0, 0.25 * 2**attempt))
        raise AssertionError("unreachable")

    def _call(self, prompt: str, generation: Generation, top_k: int, constraint: dict) -> Completion:
        sampling = generation.temperature > 0
        if self.config.protocol == "lorax":
            response = self._lorax.generate(
                prompt,
                adapter_id=self.config.model or None,
                max_new_tokens=generation.max_new_tokens,
                stop_sequences=generation.stop or None,
                do_sample=sampling,
                temperature=generation.temperature if sampling else None,
                return_k_alternatives=top_k or None,
                **constraint,
            )
            tokens = response.details.tokens
            top = None
            if top_k:
                top = tuple(_best({a.id: a.logprob for a in token.alternative_tokens or ()}, top_k) for token in tokens)
            return Completion(
                response.generated_text,
                int(response.details.prompt_tokens),
                0.0,
                tuple(token.id for token in tokens),
                _sum_or_none([token.logprob for token in tokens]),
                top,
            )
        response = self._openai.completions.create(
            model=self.config.model or "",
            prompt=prompt,
            max_tokens=generation.max_new_tokens,
            temperature=generation.temperature,
            stop=generation.stop or None,
            logprobs=top_k,
            extra_body={**({"return_tokens_as_token_ids": True} if top_k else {}), **constraint} or None,
        )
        choice = response.choices[0]
        prompt_tokens = response.usage.prompt_tokens if response.usage else 0
        logprobs = choice.logprobs
        if logprobs is None or not logprobs.token_logprobs:
            if top_k:
                raise EndpointError("the endpoint returned no logprobs, which top-k needs")
            return Completion(choice.text, int(prompt_tokens), 0.0)
        token_ids: tuple[int, ...] = ()
        top = None
        if top_k:
            token_ids = tuple(_token_id(name) for name in logprobs.tokens or ())
            top = tuple(
                _best({_token_id(name): value for name, value in (entry or {}).items()}, top_k)
                for entry in logprobs.top_logprobs or ()
            )
        return Completion(choice.text, int(prompt_tokens), 0.0, token_ids, _sum_or_none(logprobs.token_logprobs), top)


def _best(scores: dict[int, float], k: int) -> dict[int, float]:
    """The ``k`` highest-scoring entries of ``scores``, best first."""
    return dict(sorted(scores.items(), key=lambda item: -item[1])[:k])


def _sum_or_none(values: list[float | None]) -> float | None:
    return None if not values or any(value is None for value in values) else float(sum(values))


def _token_id(name: str) -> int:
    """A token id from vLLM's ``token_id:<id>`` token names."""
    prefix, _, number = name.rpartition(":")
    if prefix != "token_id" or not number.isdigit():
        raise EndpointError(
            f"the endpoint named a token {name!r}, not 'token_id:<id>'; top-k distillation over the "
            "OpenAI protocol needs a server that honours return_tokens_as_token_ids (vLLM, stillhouse serve)"
        )
    return int(number)


def bounded_map(function: Callable[[T], R], items: Iterable[T], concurrency: int) -> Iterator[R]:
    """``function`` over ``items`` with at most ``concurrency`` calls in flight, results in order."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        yield from pool.map(function, items)


def _plain_session(pool_size: int):
    """A requests session without automatic retries, sized for ``pool_size`` concurrent calls."""
    import requests

    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _is_permanent(error: Exception) -> bool:
    """Errors that another attempt cannot fix: the request itself is wrong."""
    import lorax.errors
    import openai

    permanent = (
        EndpointError,  # the answer lacks what was asked for (token ids, logprobs)
        lorax.errors.BadRequestError,
        lorax.errors.ValidationError,
        lorax.errors.NotFoundError,
        lorax.errors.UnprocessableEntityError,
        lorax.errors.GenerationError,  # LoRAX's answer to an unknown or non-servable adapter
        openai.BadRequestError,
        openai.NotFoundError,
        openai.AuthenticationError,
        openai.PermissionDeniedError,
        openai.UnprocessableEntityError,
    )
    return isinstance(error, permanent)
