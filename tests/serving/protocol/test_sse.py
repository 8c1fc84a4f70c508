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


def test_a_non_finite_number_ends_the_stream_with_an_error_event_never_invalid_json():
    async def source():
        yield token("a")
        yield token("b")

    async def payloads(events):
        logprobs = iter([-0.5, float("nan")])
        async for _ in events:
            yield {"logprob": next(logprobs)}

    events = source()
    frames = collect(sse.frames(payloads(events), events))
    assert frames[0] == b'data: {"logprob": -0.5}\n\n'
    assert frames[1].startswith(b'data: {"error": ') and b'"error_type": "generation"' in frames[1] and b"NaN" not in frames[1]
    assert len(frames) == 2
