"""The inference server: the base model and registry adapters behind LoRAX and OpenAI APIs.

Handlers stay thin: they parse the wire format (``serving/protocol``), hand a tokenized
request to the engine through ``Service``, and write the answer back. Every refusal is a
``ServingError`` turned into ``{"error", "error_type"}`` by one handler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict

from monitoring.catalog import BASE_ADAPTER_LABEL, UNKNOWN_ADAPTER_LABEL
from monitoring.metrics import RequestLogMetrics, ServerMetrics
from serving import servability
from serving.engines.base import AdapterRef, Engine, GenerationRequest, GenerationResult, SamplingParams, TokenEvent
from serving.errors import (
    AdapterNotFoundError,
    AdapterNotServableError,
    ForbiddenError,
    IncompleteGenerationError,
    ServingError,
    UnauthorizedError,
    ValidationError,
)
from serving.protocol import lorax, openai
from serving.registry import Registry
from serving.request_log import Exchange, RequestLog, new_request_id

# Metric outcome for each error type a request can end with.
OUTCOME_BY_ERROR = {
    "validation": "validation",
    "overloaded": "overloaded",
    "incomplete_generation": "incomplete",
}


@dataclass
class ServerSettings:
    """How the server behaves; every field has a CLI flag in `stillhouse serve`."""

    profile: str = "strict"
    admin_token: str | None = None
    default_max_new_tokens: int = 256  # LoRAX uses all remaining context; on CPU that is minutes
    max_stop_sequences: int = 4
    max_input_length: int | None = None  # default: max_total_tokens - 1
    request_log: Path | None = None  # SQLite file recording every exchange


@dataclass
class Prepared:
    """A request ready for the engine, plus what the response needs to say."""

    request: GenerationRequest
    adapter_label: str
    adapter_id: str  # as the client should see it: canonical id, or "" for the base
    started: float


@dataclass
class Service:
    """What the handlers call: adapter resolution, validation, generation and metrics."""

    engine: Engine
    registry: Registry
    base_dir: Path
    settings: ServerSettings
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    request_log: RequestLog | None = None
    _servable: set[str] = field(default_factory=set)
    _loading: asyncio.Lock = field(default_factory=asyncio.Lock)

    # --- adapters --------------------------------------------------------------------

    def is_base(self, adapter_id: str | None) -> bool:
        return not adapter_id or adapter_id == self.engine.model_name

    def resolve(self, adapter_id: str | None) -> AdapterRef | None:
        """The registry adapter an id names (``None`` for the base), checked for servability once."""
        if self.is_base(adapter_id):
            return None
        entry = self.registry.resolve(adapter_id)
        if entry.id not in self._servable:
            violations = servability.check_adapter(entry.path, self.base_dir, profile=self.settings.profile)
            if violations:
                reasons = "; ".join(str(v) for v in violations)
                raise AdapterNotServableError(f"adapter {entry.id} is not servable here ({self.settings.profile} profile): {reasons}")
            self._servable.add(entry.id)
        return AdapterRef(adapter_id=entry.id, path=entry.path)

    async def ensure_resident(self, adapter: AdapterRef | None) -> None:
        """Load an adapter before its first request, so the load time is measured on its own."""
        if adapter is None or adapter.adapter_id in self.engine.resident_adapters():
            return
        async with self._loading:
            seconds = await self.engine.load_adapter(adapter)
        if seconds:
            self.metrics.adapter_load.labels(adapter.adapter_id).observe(seconds)
        self.metrics.resident_adapters.set(len(self.engine.resident_adapters()))

    async def unload(self, adapter_id: str) -> bool:
        canonical = self.registry.resolve(adapter_id).id
        unloaded = await self.engine.unload_adapter(canonical)
        self.metrics.resident_adapters.set(len(self.engine.resident_adapters()))
        return unloaded

    # --- requests --------------------------------------------------------------------

    def max_input_length(self) -> int:
        return self.settings.max_input_length or self.engine.max_total_tokens - 1

    async def prepare(
        self,
        prompt: str,
        adapter_id: str | None,
        params: SamplingParams,
        requested_max_new_tokens: int | None,
        truncate: int | None = None,
    ) -> Prepared:
        started = time.perf_counter()
        label = UNKNOWN_ADAPTER_LABEL
        try:
            adapter = self.resolve(adapter_id)
            label = adapter.adapter_id if adapter else BASE_ADAPTER_LABEL
            ids = self.engine.tokenize(prompt)
            if truncate is not None and len(ids) > truncate:
                ids = ids[-truncate:]
            if len(ids) > self.max_input_length():
                raise ValidationError(
                    f"`inputs` must have less than {self.max_input_length()} tokens. Given: {len(ids)}; "
                    "shorten the prompt or set `truncate`"
                )
            remaining = self.engine.max_total_tokens - len(ids)
            max_new = requested_max_new_tokens or min(self.settings.default_max_new_tokens, remaining)
            if len(ids) + max_new > self.engine.max_total_tokens:
                raise ValidationError(
                    f"`inputs` tokens + `max_new_tokens` must be <= {self.engine.max_total_tokens}. "
                    f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`; lower max_new_tokens"
                )
            await self.ensure_resident(adapter)
        except ServingError as error:
            self.metrics.observe_request(label, outcome_for(error))
            raise
        params = dataclasses.replace(params, max_new_tokens=max_new)
        return Prepared(
            request=GenerationRequest(prompt_ids=ids, params=params, adapter=adapter),
            adapter_label=label,
            adapter_id=adapter.adapter_id if adapter else "",
            started=started,
        )

    async def stream(self, prepared: Prepared) -> AsyncIterator[TokenEvent | GenerationResult]:
        """Engine events for a prepared request, with metrics recorded at the end.

        Raises ``OverloadedError`` before the first event when the queue is full.
        """
        first_token_at = None
        outcome = "cancelled"
        self.metrics.queue_depth.set(self.engine.queue_depth() + 1)
        events = self.engine.generate(prepared.request)
        try:
            async for event in events:
                if isinstance(event, TokenEvent):
                    first_token_at = first_token_at or time.perf_counter()
                else:
                    outcome = "success"
                    now = time.perf_counter()
                    self.metrics.observe_request(
                        prepared.adapter_label,
                        "success",
                        duration_s=now - prepared.started,
                        ttft_s=(first_token_at or now) - prepared.started,
                        prompt_tokens=event.prompt_tokens,
                        generated_tokens=event.generated_tokens,
                    )
                yield event
        except ServingError as error:
            outcome = outcome_for(error)
            raise
        finally:
            await events.aclose()
            if outcome != "success":
                self.metrics.observe_request(prepared.adapter_label, outcome)
            self.metrics.queue_depth.set(self.engine.queue_depth())

    async def complete(self, prepared: Prepared) -> GenerationResult:
        result = None
        async for event in self.stream(prepared):
            if isinstance(event, GenerationResult):
                result = event
        if result is None:
            raise IncompleteGenerationError("generation ended without a result")
        return result

    def log_exchange(
        self,
        request: Request,
        protocol: str,
        prompt: str,
        parameters: BaseModel,
        prepared: Prepared | None,
        result: GenerationResult | None,
        output: str | None,
        error: ServingError | None = None,
    ) -> None:
        """Queue one exchange for the request log (a no-op without ``--request-log``)."""
        if self.request_log is None:
            return
        started = prepared.started if prepared else request.state.arrived
        self.request_log.record(
            Exchange(
                request_id=request.state.request_id,
                prompt=prompt,
                protocol=protocol,
                adapter=prepared.adapter_label if prepared else None,
                output=output,
                parameters=parameters.model_dump(exclude_none=True, exclude={"api_token", "prompt", "messages"}),
                prompt_tokens=result.prompt_tokens if result else None,
                generated_tokens=result.generated_tokens if result else None,
                latency_ms=(time.perf_counter() - started) * 1000,
                ttft_ms=result.time_to_first_token_s * 1000 if result else None,
                status=error.status_code if error else 200,
                outcome=outcome_for(error) if error else ("success" if result else "cancelled"),
            )
        )

    # --- admin -----------------------------------------------------------------------

    def check_admin(self, request: Request) -> None:
        """Refuse admin calls without the right bearer token (401 none sent, 403 wrong or disabled)."""
        if not self.settings.admin_token:
            raise ForbiddenError("the admin API is disabled; start the server with --admin-token TOKEN")
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise UnauthorizedError("send the admin token as `Authorization: Bearer TOKEN`")
        if not hmac.compare_digest(header[7:].strip().encode(), self.settings.admin_token.encode()):
            raise ForbiddenError("wrong admin token")


def outcome_for(error: ServingError) -> str:
    if isinstance(error, AdapterNotFoundError):
        return "not_found"
    if isinstance(error, AdapterNotServableError):
        return "not_servable"
    return OUTCOME_BY_ERROR.get(error.error_type, "generation")


def error_body(error: ServingError) -> dict:
    return {"error": error.message, "error_type": error.error_type}


def timing_headers(prepared: Prepared, result: GenerationResult, model_name: str) -> dict[str, str]:
    """LoRAX's response headers (times in ms), which the A/B router reads per arm."""
    total_ms = (time.perf_counter() - prepared.started) * 1000
    per_token = (result.total_time_s - result.time_to_first_token_s) / max(result.generated_tokens - 1, 1)
    return {
        "x-model-id": model_name,
        "x-adapter-id": prepared.adapter_id,
        "x-prompt-tokens": str(result.prompt_tokens),
        "x-generated-tokens": str(result.generated_tokens),
        "x-total-tokens": str(result.prompt_tokens + result.generated_tokens),
        "x-queue-time": str(round(result.queue_time_s * 1000)),
        "x-inference-time": str(round((result.total_time_s - result.queue_time_s) * 1000)),
        "x-time-to-first-token": str(round(result.time_to_first_token_s * 1000)),
        "x-time-per-output-token": str(round(per_token * 1000)),
        "x-total-time": str(round(total_ms)),
    }


GENERATION_PATHS = {"/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"}
_REQUEST_ID_CHARS = set("0123456789abcdefABCDEF-")


class RequestIdMiddleware:
    """Give every generation request an id (the caller's ``x-request-id`` when sane) and echo it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        # Only short hex ids are trusted, so a client cannot inject text into logs.
        request_id = sent if 0 < len(sent) <= 64 and set(sent) <= _REQUEST_ID_CHARS else new_request_id()
        scope.setdefault("state", {})
        scope["state"]["request_id"] = request_id
        scope["state"]["arrived"] = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def _first_event(events: AsyncIterator) -> tuple[object, AsyncIterator]:
    """Pull the first event so queue-full and validation errors become HTTP errors, not stream events."""
    first = await events.__anext__()
    return first, events


class AdapterIdBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter_id: str


class LoadLoraBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str | None = None
    load_inplace: bool = False


class UnloadLoraBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str | None = None
    lora_int_id: int | None = None


def create_app(service: Service) -> FastAPI:
    """The FastAPI app; the engine starts and stops with it."""
    engine = service.engine

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if service.settings.request_log and service.request_log is None:
            dropped = RequestLogMetrics(service.metrics.registry).dropped_rows.labels("server")
            service.request_log = RequestLog.open(service.settings.request_log, on_drop=dropped.inc)
        await engine.start()
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            await engine.stop()
            if service.request_log is not None:
                service.request_log.close()  # flushes every accepted row

    app = FastAPI(title="Stillhouse inference server", lifespan=lifespan)
    app.state.ready = False
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, error: ServingError):
        return JSONResponse(error_body(error), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, error: RequestValidationError):
        service.metrics.observe_request(UNKNOWN_ADAPTER_LABEL, "validation")
        messages = []
        for problem in error.errors():
            where = ".".join(str(part) for part in problem["loc"] if part != "body")
            messages.append(f"{where or 'body'}: {problem['msg']}")
        return JSONResponse({"error": "; ".join(messages), "error_type": "validation"}, status_code=422)

    # --- health and info ---------------------------------------------------------------

    @app.get("/health")
    @app.get("/ping")
    async def health():
        if not app.state.ready:
            return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
        return Response(status_code=200)

    @app.get("/info")
    async def info():
        return {
            "model_id": engine.model_name,
            "model_device_type": "cpu",
            "engine": type(engine).__name__,
            "max_input_length": service.max_input_length(),
            "max_total_tokens": engine.max_total_tokens,
            "max_stop_sequences": service.settings.max_stop_sequences,
            "max_best_of": 1,
            "default_max_new_tokens": service.settings.default_max_new_tokens,
            "adapter_source": "local",
            "servability_profile": service.settings.profile,
            "registry": str(service.registry.root),
            "resident_adapters": engine.resident_adapters(),
        }

    @app.get("/metrics")
    async def metrics():
        service.metrics.queue_depth.set(engine.queue_depth())
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- LoRAX native ------------------------------------------------------------------

    async def lorax_prepare(body: lorax.GenerateRequest) -> Prepared:
        parameters = body.parameters
        try:
            lorax.check_stop_count(parameters, service.settings.max_stop_sequences)
        except ValidationError as error:
            service.metrics.observe_request(UNKNOWN_ADAPTER_LABEL, "validation")
            raise error
        params = lorax.sampling_params(parameters, max_new_tokens=1)
        return await service.prepare(
            body.inputs, parameters.adapter_id, params, parameters.max_new_tokens, parameters.truncate
        )

    async def lorax_generate(body: lorax.GenerateRequest, request: Request, as_list: bool):
        prepared = None
        try:
            prepared = await lorax_prepare(body)
            result = await service.complete(prepared)
        except ServingError as error:
            service.log_exchange(request, "lorax", body.inputs, body.parameters, prepared, None, None, error)
            raise
        service.log_exchange(request, "lorax", body.inputs, body.parameters, prepared, result, result.generated_text)
        payload = lorax.generate_response(result, body.parameters, body.inputs)
        return JSONResponse([payload] if as_list else payload, headers=timing_headers(prepared, result, engine.model_name))

    async def lorax_stream(body: lorax.GenerateRequest, request: Request):
        prepared = None
        try:
            prepared = await lorax_prepare(body)
            first, events = await _first_event(service.stream(prepared))
        except ServingError as error:
            service.log_exchange(request, "lorax", body.inputs, body.parameters, prepared, None, None, error)
            raise

        async def body_iter():
            # The last token travels with the final text, so each token waits for the next event.
            pending = first
            result = failure = None
            try:
                async for event in events:
                    if isinstance(event, GenerationResult):
                        result = event
                        if isinstance(pending, TokenEvent):
                            yield sse(lorax.stream_event(pending.token, event, body.parameters, body.inputs))
                        pending = None
                        break
                    if isinstance(pending, TokenEvent):
                        yield sse(lorax.stream_event(pending.token, None, body.parameters, body.inputs))
                    pending = event
            except ServingError as error:
                failure = error
                yield sse(error_body(error))
            finally:
                await events.aclose()
                output = result.generated_text if result else None
                service.log_exchange(request, "lorax", body.inputs, body.parameters, prepared, result, output, failure)

        headers = {"x-model-id": engine.model_name, "x-adapter-id": prepared.adapter_id, "x-prompt-tokens": str(len(prepared.request.prompt_ids))}
        return StreamingResponse(body_iter(), media_type="text/event-stream", headers=headers)

    @app.post("/")
    async def compat_generate(body: lorax.GenerateRequest, request: Request):
        if body.stream:
            return await lorax_stream(body, request)
        return await lorax_generate(body, request, as_list=True)

    @app.post("/generate")
    async def generate(body: lorax.GenerateRequest, request: Request):
        return await lorax_generate(body, request, as_list=False)

    @app.post("/generate_stream")
    async def generate_stream(body: lorax.GenerateRequest, request: Request):
        return await lorax_stream(body, request)

    # --- OpenAI ------------------------------------------------------------------------

    def model_entries() -> list[dict]:
        created = int(time.time())
        base = {"id": engine.model_name, "object": "model", "created": created, "owned_by": "stillhouse", "root": engine.model_name, "parent": None}
        entries = [base]
        latest: dict[str, str] = {}
        for entry in service.registry.list():
            latest[entry.name] = entry.id
            entries.append({**base, "id": entry.id, "root": entry.id, "parent": engine.model_name})
        entries += [{**base, "id": name, "root": target, "parent": engine.model_name} for name, target in latest.items()]
        return entries

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": model_entries()}

    async def openai_answer(body: openai._Common, request: Request, prompt: str, max_tokens: int | None, chat: bool):
        protocol = "openai_chat" if chat else "openai_completions"
        prepared = None
        try:
            prepared = await service.prepare(prompt, body.model, body.sampling_params(1), max_tokens)
            if not body.stream:
                result = await service.complete(prepared)
            else:
                first, events = await _first_event(service.stream(prepared))
        except ServingError as error:
            service.log_exchange(request, protocol, prompt, body, prepared, None, None, error)
            raise
        request_id = openai.new_id("chatcmpl" if chat else "cmpl")
        model = body.model or engine.model_name
        stop = body.stop_sequences()
        if not body.stream:
            text = openai.strip_stop(result.generated_text, result, stop)
            service.log_exchange(request, protocol, prompt, body, prepared, result, text)
            if chat:
                payload = openai.chat_response(request_id, model, text, result)
            else:
                echo = prompt if getattr(body, "echo", False) else ""
                payload = openai.completion_response(request_id, model, echo + text, result, body)
            return JSONResponse(payload, headers=timing_headers(prepared, result, engine.model_name))

        def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
                return sse(openai.chat_chunk(request_id, model, delta, finish))
            return sse(openai.completion_chunk(request_id, model, text or "", finish))

        async def body_iter():
            held = openai.StopTextStream(stop)
            result = failure = None
            try:
                if chat:
                    yield chunk(None, None, role=True)
                elif getattr(body, "echo", False):
                    yield chunk(prompt, None)
                event = first
                while True:
                    if isinstance(event, GenerationResult):
                        result = event
                        rest = held.finish(openai.strip_stop(event.generated_text, event, stop))
                        if rest:
                            yield chunk(rest, None)
                        yield chunk(None if chat else "", openai.FINISH_REASONS[event.finish_reason])
                        if body.include_usage_in_stream():
                            name = "chat.completion.chunk" if chat else "text_completion"
                            yield sse(openai.usage_chunk(request_id, model, name, event))
                        break
                    piece = held.push(event.token.text)
                    if piece:
                        yield chunk(piece, None)
                    event = await events.__anext__()
                yield sse("[DONE]")
            except ServingError as error:
                failure = error
                yield sse(error_body(error))
            finally:
                await events.aclose()
                output = openai.strip_stop(result.generated_text, result, stop) if result else None
                service.log_exchange(request, protocol, prompt, body, prepared, result, output, failure)

        headers = {"x-model-id": engine.model_name, "x-adapter-id": prepared.adapter_id}
        return StreamingResponse(body_iter(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/completions")
    async def completions(body: openai.CompletionRequest, request: Request):
        return await openai_answer(body, request, body.prompt_text(), body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: openai.ChatCompletionRequest, request: Request):
        try:
            prompt = engine.apply_chat_template(body.message_dicts())
        except ValueError as error:
            raise ValidationError(f"messages: {error}") from error
        return await openai_answer(body, request, prompt, body.requested_max_tokens(), chat=True)

    # --- admin -------------------------------------------------------------------------

    @app.get("/admin/adapters")
    async def admin_adapters(request: Request):
        service.check_admin(request)
        return {
            "resident": engine.resident_adapters(),
            "registry": [{"id": e.id, "path": str(e.path), **e.metadata} for e in service.registry.list()],
        }

    @app.post("/admin/adapters/load")
    async def admin_load(body: AdapterIdBody, request: Request):
        service.check_admin(request)
        adapter = service.resolve(body.adapter_id)
        if adapter is None:
            raise ValidationError("`adapter_id` names the base model, which is always loaded")
        started = time.perf_counter()
        await service.ensure_resident(adapter)
        return {"adapter_id": adapter.adapter_id, "resident": True, "seconds": round(time.perf_counter() - started, 3)}

    @app.post("/admin/adapters/unload")
    async def admin_unload(body: AdapterIdBody, request: Request):
        service.check_admin(request)
        return {"adapter_id": body.adapter_id, "unloaded": await service.unload(body.adapter_id)}

    # vLLM's runtime LoRA endpoints, for tools written against vLLM.
    @app.post("/v1/load_lora_adapter")
    async def vllm_load(body: LoadLoraBody, request: Request):
        service.check_admin(request)
        if body.lora_path:
            from serving.registry import NotServableError

            try:
                service.registry.add(Path(body.lora_path), body.lora_name, base_dir=service.base_dir, profile=service.settings.profile)
            except NotServableError as error:
                return JSONResponse(error_body(error), status_code=400)
        await service.ensure_resident(service.resolve(body.lora_name))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def vllm_unload(body: UnloadLoraBody, request: Request):
        service.check_admin(request)
        if not body.lora_name:
            raise ValidationError("`lora_name` is required; integer ids are not used by this server")
        if not await service.unload(body.lora_name):
            return JSONResponse({"error": f"adapter {body.lora_name} is not loaded", "error_type": "not_found"}, status_code=404)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app
