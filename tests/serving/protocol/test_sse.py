"""Server-sent events framing."""

from __future__ import annotations

import asyncio

from serving.protocol import sse
from tests.serving.protocol.events import collect, result, token


def test_payloads_are_data_lines():
    assert sse.encode({"text": "é"}) == 'data: {"text": "é"}\n\n'.encode()
    assert sse.encode("[DONE]") == b"data: [DONE]\n\n"


def test_frames_close_the_source_even_when_the_client_leaves():
    closed = []

    async def source():
        try:
            yield token("a")
            yield result("a")
        finally:
            closed.append(True)

    async def payloads(events):
        async for event in events:
            yield {"event": type(event).__name__}

    events = source()
    assert collect(sse.frames(payloads(events), events)) == [b'data: {"event": "TokenEvent"}\n\n', b'data: {"event": "GenerationResult"}\n\n']
    assert closed == [True]

    async def leave_after_one():
        events = source()
        frames = sse.frames(payloads(events), events)
        await frames.__anext__()
        await frames.aclose()  # what the server does when the client disconnects

    asyncio.run(leave_after_one())
    assert closed == [True, True]
