"""Server-sent events framing, shared by the LoRAX and OpenAI streams."""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import AsyncIterator


def encode(payload: dict | str) -> bytes:
    """One ``data:`` event; a string (OpenAI's ``[DONE]``) is sent as is, anything else as JSON."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def frames(payloads: AsyncIterator[dict | str], source: AsyncIterator) -> AsyncIterator[bytes]:
    """``payloads`` as SSE bytes; ``source``, the stream they are made from, is closed at the end or on disconnect."""
    async with aclosing(source), aclosing(payloads):
        async for payload in payloads:
            yield encode(payload)
