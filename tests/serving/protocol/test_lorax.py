"""LoRAX stream events from engine events, without HTTP."""

from __future__ import annotations

from serving.errors import GenerationError
from serving.protocol import lorax
from tests.serving.protocol.events import collect, result, stream, token


def events_for(*items, **parameters) -> list[dict]:
    return collect(lorax.stream_events(stream(*items), lorax.GenerateParameters(**parameters), "Q: "))


def test_each_token_is_an_event_and_the_last_carries_text_and_details():
    events = events_for(token("a", 1), token("b", 2), token("c", 3), result("abc"))
    assert [e["token"]["text"] for e in events] == ["a", "b", "c"]
    assert [e["token"]["id"] for e in events] == [1, 2, 3]
    assert [e["generated_text"] for e in events] == [None, None, "abc"]
    assert events[0]["details"] is None and events[1]["details"] is None
    assert events[-1]["details"] == {"finish_reason": "length", "prompt_tokens": 3, "generated_tokens": 3, "seed": None}


def test_full_text_and_no_details():
    [event] = events_for(token("a"), result("a"), return_full_text=True, details=False)
    assert event["generated_text"] == "Q: a" and event["details"] is None


def test_an_engine_error_ends_the_stream_with_an_error_event():
    events = events_for(token("a"), token("b"), GenerationError("generation failed: boom"))
    # "b" was waiting for the next event to know whether it is the last one
    assert [e.get("token", {}).get("text") for e in events] == ["a", None]
    assert events[-1] == {"error": "generation failed: boom", "error_type": "generation"}


def test_a_result_without_tokens_sends_nothing():
    assert events_for(result("")) == []
