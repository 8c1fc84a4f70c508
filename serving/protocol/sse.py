"""Server-sent events framing, shared by the LoRAX and OpenAI streams."""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import AsyncIterator

from serving.errors import GenerationError


def encode(payload: dict | str) -> bytes:
    """One ``data:`` event; a string (OpenAI's ``[DONE]``) is sent as is, anything else as strict JSON.

    Raises ``ValueError`` for a NaN or infinite number, which JSON cannot hold.
    """
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, allow_nan=False)
    return f"data: {data}\n\n".encode()


async def frames(payloads: AsyncIterator[dict | str], source: AsyncIterator) -> AsyncIterator[bytes]:
    """``payloads`` as SSE bytes; ``source``, the stream they are made from, is closed at the end or on disconnect.

    An event JSON cannot hold (a non-finite logprob) ends the stream with an error event instead.
    """
    async with aclosing(source), aclosing(payloads):
        async for payload in payloads:
            try:
                frame = encode(payload)
            except ValueError:
                yield encode(GenerationError("the engine produced a non-finite number; generation stopped").body())
                return
            yield frame
