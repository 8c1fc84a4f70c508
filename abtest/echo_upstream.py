"""An upstream that speaks just enough LoRAX and OpenAI to answer ``NAME|ADAPTER|PROMPT``.

Its answers say which upstream a request reached, with which adapter and prompt, at almost no
cost: what checking the router's mechanics (assignment, rewriting, fallback) and measuring the
router's own latency need, with no model behind it. Like the inference server, it refuses a body
it cannot answer with 422 in the LoRAX error shape, so a fuzzed request never looks like an
upstream failure.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class _Refused(Exception):
    """A body the echo cannot answer; ``message`` names the field."""


def _lorax_fields(body: object) -> tuple[str | None, str]:
    """(adapter_id, inputs) of a LoRAX body."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
        raise _Refused("`inputs` must be a string")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict) or not isinstance(parameters.get("adapter_id"), (str, type(None))):
        raise _Refused("`parameters.adapter_id` must be a string")
    return parameters.get("adapter_id"), body["inputs"]


def _openai_fields(body: object, chat: bool) -> tuple[str | None, str]:
    """(model, prompt or last message) of an OpenAI body."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), (str, type(None))):
        raise _Refused("`model` must be a string")
    if not chat:
        if not isinstance(body.get("prompt"), str):
            raise _Refused("`prompt` must be a string")
        return body.get("model"), body["prompt"]
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) or not isinstance(messages[-1].get("content"), str):
        raise _Refused("`messages` must end with a message whose content is a string")
    return body.get("model"), messages[-1]["content"]


def create_echo_upstream(name: str) -> FastAPI:
    """An upstream whose answers name it, the adapter it was asked for, and the prompt it got."""
    app = FastAPI()

    @app.exception_handler(_Refused)
    async def refused(request: Request, error: _Refused) -> JSONResponse:
        return JSONResponse({"error": str(error), "error_type": "validation"}, status_code=422)

    def text(adapter, prompt) -> str:
        return f"{name}|{adapter or ''}|{prompt}"

    def sse(events, done: bool = False):
        async def body():
            for event in events:
                yield f"data: {json.dumps(event)}\n\n".encode()
            if done:  # OpenAI streams end with [DONE]; LoRAX's native stream has none
                yield b"data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")

    def lorax_answer(body: dict) -> dict:
        answer = text(*_lorax_fields(body))
        return {"generated_text": answer, "details": {"finish_reason": "length", "prompt_tokens": 3, "generated_tokens": 2, "tokens": []}}

    def lorax_stream(body: dict):
        answer = text(*_lorax_fields(body))
        first = {"token": {"id": 1, "text": answer[:1], "logprob": 0.0, "special": False}, "generated_text": None, "details": None}
        last = {"token": {"id": 2, "text": answer[1:], "logprob": 0.0, "special": False}, "generated_text": answer,
                "details": {"finish_reason": "length", "prompt_tokens": 3, "generated_tokens": 2, "seed": None}}
        return sse([first, last])

    @app.post("/")
    async def compat(request: Request):
        body = await request.json()
        return lorax_stream(body) if isinstance(body, dict) and body.get("stream") else JSONResponse([lorax_answer(body)])

    @app.post("/generate")
    async def generate(request: Request):
        return lorax_answer(await request.json())

    @app.post("/generate_stream")
    async def generate_stream(request: Request):
        return lorax_stream(await request.json())

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        model, prompt = _openai_fields(body, chat=False)
        answer = text(model, prompt)
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if body.get("stream"):
            chunk = {"id": "c", "object": "text_completion", "created": 0, "model": model, "choices": [{"index": 0, "text": answer, "finish_reason": None, "logprobs": None}]}
            done = {**chunk, "choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": None}]}
            return sse([chunk, done], done=True)
        return {"id": "c", "object": "text_completion", "created": 0, "model": model, "usage": usage,
                "choices": [{"index": 0, "text": answer, "finish_reason": "length", "logprobs": None}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        model, content = _openai_fields(body, chat=True)
        answer = text(model, content)
        if body.get("stream"):
            base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model}
            return sse([{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": answer}, "finish_reason": None}]},
                        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}], done=True)
        return {"id": "c", "object": "chat.completion", "created": 0, "model": model,
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]}

    return app
