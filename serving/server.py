"""The inference server: the base model and registry adapters behind LoRAX and OpenAI APIs.

``create_app`` assembles the app: the engine's lifespan, request ids, the one error handler
(``serving.errors``) and the routes, one module per protocol under ``serving.routes``. The
logic they share lives in ``serving.service``.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from monitoring.catalog import UNKNOWN_ADAPTER_LABEL
from monitoring.metrics import RequestLogMetrics
from serving.errors import PayloadTooLargeError, ValidationError, install_error_handlers
from serving.protocol import GENERATION_PATHS
from serving.request_log import RequestLog, new_request_id
from serving.routes.admin import admin_routes
from serving.routes.lorax import lorax_routes
from serving.routes.openai import openai_routes
from serving.routes.status import status_routes
from serving.service import ServerSettings, Service

__all__ = ["ServerSettings", "Service", "create_app"]  # the service's types, importable with the app

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


class BodyLimitMiddleware:
    """Refuse a request body over ``max_bytes`` (413) before any of it is parsed.

    The body is read here in full (the routes parse JSON, which needs all of it anyway) and
    handed on; a declared ``content-length`` over the limit is refused without reading.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: the disconnect, when it comes
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        error = PayloadTooLargeError(f"the request body is over {self.max_bytes} bytes; send a shorter prompt (the server's --max-body-bytes)")
        await JSONResponse(error.body(), status_code=error.status_code, headers={"connection": "close"})(scope, receive, send)


def create_app(service: Service) -> FastAPI:
    """The FastAPI app; the engine and the request log start and stop with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if service.settings.request_log and service.request_log is None:
            hooks = RequestLogMetrics(service.metrics.registry).hooks("server")
            service.request_log = RequestLog.open(service.settings.request_log, **hooks)
        await service.engine.start()
        await service.pin_adapters()
        service.metrics.set_info(type(service.engine).__name__, service.engine.model_name, service.settings.profile)
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            await service.engine.stop()
            if service.request_log is not None:
                service.request_log.close()  # flushes every accepted row

    app = FastAPI(title="Stillhouse inference server", lifespan=lifespan)
    app.state.ready = False
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=service.settings.max_body_bytes)
    # A body FastAPI refused never reached the service, so it is counted here.
    install_error_handlers(app, on_invalid_body=lambda request: service.metrics.observe_request(UNKNOWN_ADAPTER_LABEL, ValidationError.outcome))
    for routes in (status_routes, lorax_routes, openai_routes, admin_routes):
        app.include_router(routes(service))
    return app
