"""An upstream that speaks just enough LoRAX and OpenAI to answer ``NAME|ADAPTER|PROMPT``.

Its answers say which upstream a request reached, with which adapter and prompt, at almost no
cost: what checking the router's mechanics (assignment, rewriting, fallback) and measuring the
router's own latency need, with no model behind it.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def create_echo_upstream(name: str) -> FastAPI:
    """An upstream whose answers name it, the adapter it was asked for, and the prompt it got."""
    app = FastAPI()

    def text(adapter, prompt) -> str:
        return f"{name}|{adapter or ''}|{prompt}"

    def sse(events):
        async def body():
            for event in events:
                yield f"data: {json.dumps(event)}\n\n".encode()
        return StreamingResponse(body(), media_type="text/event-stream")

    def lorax_answer(body: dict) -> dict:
        answer = text((body.get("parameters") or {}).get("adapter_id"), body["inputs"])
        return {"generated_text": answer, "details": {"finish_reason": "length", "prompt_tokens": 3, "generated_tokens": 2, "tokens": []}}

    def lorax_stream(body: dict):
        answer = text((body.get("parameters") or {}).get("adapter_id"), body["inputs"])
        first = {"token": {"id": 1, "text": answer[:1], "logprob": 0.0, "special": False}, "generated_text": None, "details": None}
        last = {"token": {"id": 2, "text": answer[1:], "logprob": 0.0, "special": False}, "generated_text": answer,
                "details": {"finish_reason": "length", "prompt_tokens": 3, "generated_tokens": 2, "seed": None}}
        return sse([first, last])

    @app.post("/")
    async def compat(request: Request):
        body = await request.json()
        return lorax_stream(body) if body.get("stream") else JSONResponse([lorax_answer(body)])

    @app.post("/generate")
    async def generate(request: Request):
        return lorax_answer(await request.json())

    @app.post("/generate_stream")
    async def generate_stream(request: Request):
        return lorax_stream(await request.json())

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        answer = text(body.get("model"), body["prompt"])
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if body.get("stream"):
            chunk = {"id": "c", "object": "text_completion", "created": 0, "model": body.get("model"), "choices": [{"index": 0, "text": answer, "finish_reason": None, "logprobs": None}]}
            done = {**chunk, "choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": None}]}
            return sse([chunk, done])
        return {"id": "c", "object": "text_completion", "created": 0, "model": body.get("model"), "usage": usage,
                "choices": [{"index": 0, "text": answer, "finish_reason": "length", "logprobs": None}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        answer = text(body.get("model"), body["messages"][-1]["content"])
        if body.get("stream"):
            base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body.get("model")}
            return sse([{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": answer}, "finish_reason": None}]},
                        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}])
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body.get("model"),
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]}

    return app
