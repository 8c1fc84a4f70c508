"""LoRAX's native routes: ``POST /`` (lorax-client's, answering a list), ``/generate`` and ``/generate_stream``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.protocol import lorax, sse
from serving.service import Call, Service


def lorax_routes(service: Service) -> APIRouter:
    """The LoRAX generation routes over ``service``."""
    routes = APIRouter()
    model_name = service.engine.model_name

    def call(body: lorax.GenerateRequest, request: Request) -> Call:
        parameters = body.parameters
        return Call(
            request_id=request.state.request_id,
            arrived=request.state.arrived,
            protocol="lorax",
            prompt=body.inputs,
            parameters=parameters,
            adapter_id=parameters.adapter_id,
            params=lorax.sampling_params(parameters, max_new_tokens=1),
            max_new_tokens=parameters.max_new_tokens,
            truncate=parameters.truncate,
            constraint=parameters.constraint(),
        )

    async def generate(body: lorax.GenerateRequest, request: Request, as_list: bool) -> Response:
        prepared = await service.prepare(call(body, request))
        result = await service.complete(prepared)
        payload = lorax.generate_response(result, body.parameters, body.inputs)
        headers = lorax.timing_headers(model_name, prepared.adapter_id, result, prepared.elapsed_s())
        return JSONResponse([payload] if as_list else payload, headers=headers)

    async def stream(body: lorax.GenerateRequest, request: Request) -> Response:
        prepared = await service.prepare(call(body, request))
        events = await service.open_stream(prepared)
        payloads = lorax.stream_events(events, body.parameters, body.inputs)
        headers = {"x-model-id": model_name, "x-adapter-id": prepared.adapter_id, "x-prompt-tokens": str(len(prepared.request.prompt_ids))}
        return StreamingResponse(sse.frames(payloads, events), media_type="text/event-stream", headers=headers)

    @routes.post("/")
    async def compat_generate(body: lorax.GenerateRequest, request: Request):
        if body.stream:
            return await stream(body, request)
        return await generate(body, request, as_list=True)

    @routes.post("/generate")
    async def generate_route(body: lorax.GenerateRequest, request: Request):
        return await generate(body, request, as_list=False)

    @routes.post("/generate_stream")
    async def generate_stream(body: lorax.GenerateRequest, request: Request):
        return await stream(body, request)

    return routes
