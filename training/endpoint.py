"""Endpoints: ask any LoRAX-protocol (lorax-client) or OpenAI-protocol (openai client) server.

Our server, LoRAX, vLLM and hosted APIs all answer through one of these two clients. Calls are
retried with exponential back-off on transient failures (overload, rate limits, timeouts,
connection errors); requests the server rejects as invalid are not retried.
"""

from __future__ import annotations

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
    """One answer: its text, the prompt's token count as the server reported it, and latency."""

    text: str
    prompt_tokens: int
    latency_s: float


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

    def complete(self, prompt: str, generation: Generation) -> Completion:
        """The endpoint's completion of ``prompt``, retried on transient failures."""
        attempts = self.config.retries + 1
        for attempt in range(attempts):
            started = time.perf_counter()
            try:
                text, prompt_tokens = self._call(prompt, generation)
                return Completion(text, prompt_tokens, time.perf_counter() - started)
            except Exception as error:  # noqa: BLE001 - classified below, re-raised when permanent
                if _is_permanent(error) or attempt == attempts - 1:
                    raise EndpointError(f"{self.identity}: {type(error).__name__}: {error}") from error
                time.sleep(min(8.0, 0.25 * 2**attempt))
        raise AssertionError("unreachable")

    def _call(self, prompt: str, generation: Generation) -> tuple[str, int]:
        sampling = generation.temperature > 0
        if self.config.protocol == "lorax":
            response = self._lorax.generate(
                prompt,
                adapter_id=self.config.model or None,
                max_new_tokens=generation.max_new_tokens,
                stop_sequences=generation.stop or None,
                do_sample=sampling,
                temperature=generation.temperature if sampling else None,
            )
            return response.generated_text, int(response.details.prompt_tokens)
        response = self._openai.completions.create(
            model=self.config.model or "",
            prompt=prompt,
            max_tokens=generation.max_new_tokens,
            temperature=generation.temperature,
            stop=generation.stop or None,
        )
        prompt_tokens = response.usage.prompt_tokens if response.usage else 0
        return response.choices[0].text, int(prompt_tokens)


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
