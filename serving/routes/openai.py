"""OpenAI's routes: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.errors import ValidationError
from serving.protocol import lorax, openai, sse
from serving.service import Call, Service


def openai_routes(service: Service) -> APIRouter:
    """The OpenAI routes over ``service``; ``model`` names an adapter id or the base."""
    routes = APIRouter()
    model_name = service.engine.model_name

    def model_entries() -> list[dict]:
        created = int(time.time())
        base = {"id": model_name, "object": "model", "created": created, "owned_by": "stillhouse", "root": model_name, "parent": None}
        entries = [base]
        latest: dict[str, str] = {}
        for entry in service.registry.list():
            latest[entry.name] = entry.id
            entries.append({**base, "id": entry.id, "root": entry.id, "parent": model_name})
        entries += [{**base, "id": name, "root": target, "parent": model_name} for name, target in latest.items()]
        return entries

    async def answer(body: openai.CompletionRequest | openai.ChatCompletionRequest, request: Request, prompt: str, max_tokens: int | None) -> Response:
        chat = isinstance(body, openai.ChatCompletionRequest)
        prepared = await service.prepare(
            Call(
                request_id=request.state.request_id,
                arrived=request.state.arrived,
                protocol="openai_chat" if chat else "openai_completions",
                prompt=prompt,
                parameters=body,
                adapter_id=body.model,
                params=body.sampling_params(1),
                max_new_tokens=max_tokens,
                answer_text=body.answer_text,
                constraint=body.constraint(),
            )
        )
        request_id = openai.new_id("chatcmpl" if chat else "cmpl")
        model = body.model or model_name
        if body.stream:
            events = await service.open_stream(prepared)
            payloads = openai.stream_chunks(events, body, request_id, model, prompt)
            headers = {"x-model-id": model_name, "x-adapter-id": prepared.adapter_id}
            return StreamingResponse(sse.frames(payloads, events), media_type="text/event-stream", headers=headers)
        result = await service.complete(prepared)
        text = body.answer_text(result)
        if chat:
            payload = openai.chat_response(request_id, model, text, result)
        else:
            payload = openai.completion_response(request_id, model, (prompt if body.echo else "") + text, result, body)
        return JSONResponse(payload, headers=lorax.timing_headers(model_name, prepared.adapter_id, result, prepared.elapsed_s()))

    @routes.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": model_entries()}

    @routes.post("/v1/completions")
    async def completions(body: openai.CompletionRequest, request: Request):
        return await answer(body, request, body.prompt_text(), body.max_tokens)

    @routes.post("/v1/chat/completions")
    async def chat_completions(body: openai.ChatCompletionRequest, request: Request):
        try:
            prompt = service.engine.apply_chat_template(body.message_dicts())
        except ValueError as error:
            raise ValidationError(f"messages: {error}") from error
        return await answer(body, request, prompt, body.requested_max_tokens())

    return routes
