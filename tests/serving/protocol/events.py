"""Engine event streams for protocol tests, built without an engine."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from serving.engines.base import Event, GenerationResult, TokenEvent, TokenInfo
from serving.errors import ServingError


def token(text: str, id: int = 1) -> TokenEvent:
    return TokenEvent(TokenInfo(id=id, text=text, logprob=-0.5, special=False))


def result(text: str, finish_reason: str = "length", generated_tokens: int | None = None) -> GenerationResult:
    return GenerationResult(
        generated_text=text, finish_reason=finish_reason, prompt_tokens=3,
        generated_tokens=len(text) if generated_tokens is None else generated_tokens, seed=None,
    )


async def stream(*items: Event | ServingError) -> AsyncIterator[Event]:
    """Yield the events in order; a ``ServingError`` among them is raised where it stands."""
    for item in items:
        if isinstance(item, ServingError):
            raise item
        yield item


def collect(payloads: AsyncIterator) -> list:
    async def run():
        return [payload async for payload in payloads]

    return asyncio.run(run())
