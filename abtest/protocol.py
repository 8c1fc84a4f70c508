"""What the router needs to know about a client call, independent of its wire protocol.

Pure functions over JSON bodies: which route a call names (``parameters.adapter_id`` for
LoRAX, ``model`` for OpenAI), how to point it at an arm (adapter and rendered prompt), and how
to read the answer back (text and token counts) from a JSON body or an SSE stream.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Callable

from serving.errors import ServingError
from serving.protocol import LORAX_PATHS, OPENAI_PATHS, sse


class BadCall(ValueError):
    """The body is not a generation request the router can route."""


@dataclass
class Call:
    """A parsed client call."""

    protocol: str  # lorax | openai_completions | openai_chat
    path: str
    body: dict
    stream: bool
    route_key: str | None  # adapter_id or model as sent

    @property
    def prompt(self) -> str:
        """The client's prompt as logged (chat: the messages as JSON)."""
        if self.protocol == "lorax":
            return str(self.body.get("inputs", ""))
        if self.protocol == "openai_completions":
            prompt = self.body.get("prompt", "")
            return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
        return json.dumps(self.body.get("messages", []), ensure_ascii=False)

    @property
    def parameters(self) -> dict:
        """The generation parameters, without the prompt."""
        if self.protocol == "lorax":
            return dict(self.body.get("parameters") or {})
        return {k: v for k, v in self.body.items() if k not in ("prompt", "messages")}


def parse_call(path: str, body: object) -> Call:
    """Classify a generation request; raise ``BadCall`` when it cannot be routed."""
    if not isinstance(body, dict):
        raise BadCall("the body must be a JSON object")
    if path in LORAX_PATHS:
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise BadCall("`parameters` must be an object")
        stream = path == "/generate_stream" or (path == "/" and bool(body.get("stream")))
        return Call("lorax", path, body, stream, _route_key(parameters.get("adapter_id"), "parameters.adapter_id"))
    if path in OPENAI_PATHS:
        return Call(OPENAI_PATHS[path], path, body, bool(body.get("stream")), _route_key(body.get("model"), "model"))
    raise BadCall(f"{path} is not a generation path")


def _route_key(value: object, field: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise BadCall(f"`{field}` must be a string naming a route or an adapter, got {type(value).__name__}")
    return value


def for_arm(call: Call, adapter: str | None, render: Callable[[str], str], *, stream: bool | None = None) -> tuple[str, dict]:
    """(path, body) sending ``call`` to an arm: its adapter, its rendered prompt.

    ``stream=False`` turns a streaming call into a plain one (shadow calls compare whole answers).
    """
    body = copy.deepcopy(call.body)
    path = call.path
    if call.protocol == "lorax":
        parameters = body.setdefault("parameters", {})
        if adapter is None:
            parameters.pop("adapter_id", None)
        else:
            parameters["adapter_id"] = adapter
        if isinstance(body.get("inputs"), str):
            body["inputs"] = render(body["inputs"])
        if stream is False:
            path = "/generate" if path == "/generate_stream" else path
            body.pop("stream", None)
        return path, body
    body["model"] = adapter or ""
    if call.protocol == "openai_completions" and isinstance(body.get("prompt"), str):
        body["prompt"] = render(body["prompt"])
    if call.protocol == "openai_chat":
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
                message["content"] = render(message["content"])
                break
    if stream is False:
        body["stream"] = False
        body.pop("stream_options", None)
    return path, body


@dataclass
class Answer:
    """The text and token counts of an upstream's answer, as far as it reported them."""

    text: str | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None


def answer_from_json(protocol: str, payload: object) -> Answer:
    """Read a non-streaming answer body."""
    if isinstance(payload, list):  # LoRAX `POST /` answers a one-element list
        payload = payload[0] if payload else {}
    if not isinstance(payload, dict):
        return Answer()
    if protocol == "lorax":
        details = payload.get("details") or {}
        return Answer(payload.get("generated_text"), details.get("prompt_tokens"), details.get("generated_tokens"))
    usage = payload.get("usage") or {}
    choices = payload.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    text = (choice.get("message") or {}).get("content") if protocol == "openai_chat" else choice.get("text")
    return Answer(text, usage.get("prompt_tokens"), usage.get("completion_tokens"))


def stream_error_event(protocol: str, error: ServingError) -> bytes:
    """The SSE event that ends a stream cut short: LoRAX's error event, or an OpenAI error chunk."""
    if protocol == "lorax":
        return sse.encode(error.body())
    return sse.encode({"error": {"message": error.message, "type": error.error_type, "param": None, "code": None}})


@dataclass
class StreamAnswer:
    """Accumulates an answer from SSE bytes as they are relayed.

    ``ended`` tells whether the stream said it was over: LoRAX's last event (with
    ``generated_text``), OpenAI's ``[DONE]``, or an error event of either.
    """

    protocol: str
    answer: Answer = field(default_factory=Answer)
    ended: bool = False
    _buffer: bytes = b""
    _pieces: list[str] = field(default_factory=list)

    def feed(self, chunk: bytes) -> None:
        """Consume relayed bytes; complete ``data:`` lines update the answer."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if line.startswith(b"data:"):
                self._event(line[5:].strip())

    def _event(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.ended = True
        if not data or data == b"[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if "error" in event:
            self.ended = True
            return
        if self.protocol == "lorax":
            token = event.get("token") or {}
            if isinstance(token.get("text"), str) and not token.get("special"):
                self._pieces.append(token["text"])
            if event.get("generated_text") is not None:
                self.answer.text = event["generated_text"]
                self.ended = True
            details = event.get("details") or {}
            self.answer.prompt_tokens = details.get("prompt_tokens", self.answer.prompt_tokens)
            self.answer.generated_tokens = details.get("generated_tokens", self.answer.generated_tokens)
            return
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if self.protocol == "openai_chat" else choice.get("text")
            if isinstance(piece, str):
                self._pieces.append(piece)
        usage = event.get("usage") or {}
        self.answer.prompt_tokens = usage.get("prompt_tokens", self.answer.prompt_tokens)
        self.answer.generated_tokens = usage.get("completion_tokens", self.answer.generated_tokens)

    @property
    def partial(self) -> bool:
        """Whether the bytes so far end inside an unfinished line."""
        return bool(self._buffer.strip())

    def result(self) -> Answer:
        """The answer so far: LoRAX's final text when sent, else the pieces joined."""
        if self.answer.text is None and self._pieces:
            self.answer.text = "".join(self._pieces)
        return self.answer
