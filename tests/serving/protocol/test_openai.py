"""OpenAI stream chunks from engine events, without HTTP: stop text is held back, never sent."""

from __future__ import annotations

from serving.errors import IncompleteGenerationError
from serving.protocol import openai
from tests.serving.protocol.events import collect, result, stream, token


def completion_chunks(*items, **fields) -> list:
    body = openai.CompletionRequest(prompt="P", stream=True, **fields)
    return collect(openai.stream_chunks(stream(*items), body, "cmpl-1", "m", "P"))


def texts(chunks: list) -> list[str]:
    return [c["choices"][0]["text"] for c in chunks if isinstance(c, dict) and c.get("choices")]


def test_a_possible_stop_sequence_is_held_until_it_cannot_complete():
    chunks = completion_chunks(token("A"), token("\n"), token("B"), result("A\nB"), stop=["\n\n"])
    assert texts(chunks) == ["A", "\nB", ""]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1] == "[DONE]"


def test_a_completed_stop_sequence_is_never_sent():
    chunks = completion_chunks(token("A"), token("\n"), token("\nB"), result("A\n\nB", "stop_sequence"), stop=["\n\n"])
    assert "".join(texts(chunks)) == "A"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_echo_sends_the_prompt_first():
    chunks = completion_chunks(token("x"), result("x"), echo=True)
    assert texts(chunks) == ["P", "x", ""]


def test_chat_opens_with_the_role_and_ends_with_usage_and_done():
    body = openai.ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
    )
    chunks = collect(openai.stream_chunks(stream(token("he"), token("y"), result("hey")), body, "chatcmpl-1", "m", "hi"))
    deltas = [c["choices"][0]["delta"] for c in chunks[:-2]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "he"}, {"content": "y"}, {}]
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"
    assert chunks[-2]["object"] == "chat.completion.chunk" and chunks[-2]["choices"] == []
    assert chunks[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert chunks[-1] == "[DONE]"


def test_an_engine_error_ends_the_stream_with_an_error_event_and_no_done():
    chunks = completion_chunks(token("A"), IncompleteGenerationError("the engine stopped"))
    assert texts(chunks) == ["A"]
    assert chunks[-1] == {"error": "the engine stopped", "error_type": "incomplete_generation"}
