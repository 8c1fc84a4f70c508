"""Errors a client can cause, each with its HTTP status, LoRAX ``error_type`` and metric outcome.

One exception class per failure kind, one handler for the server and the router alike
(``install_error_handlers``): the body is always ``{"error": message, "error_type": type}``,
which lorax-client maps to its own classes. ``outcome`` is the ``outcome`` label a refused
request is counted under (``monitoring.catalog.OUTCOMES``; ``upstream_error`` is the router's);
``None`` marks refusals that are not generation requests and are never counted.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serving.surrogates import replace_surrogates

# Framework-raised statuses and the LoRAX error type each answers under (other 4xx: validation).
_HTTP_ERROR_TYPES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 429: "overloaded"}


class ServingError(Exception):
    """Base class: a request refused or failed, with a LoRAX error type, status and outcome."""

    status_code = 424
    error_type = "generation"
    outcome: str | None = "generation"

    def __init__(self, message: str):
        message = replace_surrogates(message)  # it may quote the request, and must encode as UTF-8
        super().__init__(message)
        self.message = message

    def body(self) -> dict:
        """The LoRAX error body, as a response or as a stream's last event."""
        return {"error": self.message, "error_type": self.error_type}


class ValidationError(ServingError):
    """Bad parameters, an empty prompt, or a prompt longer than the model allows."""

    status_code = 422
    error_type = "validation"
    outcome = "validation"


class PayloadTooLargeError(ValidationError):
    """The request body is over the size limit."""

    status_code = 413


class FrameworkError(ServingError):
    """An error the web framework raised before any handler ran (no such path, wrong method, unreadable body)."""

    status_code = 400
    error_type = "validation"
    outcome = None

    def __init__(self, message: str, status_code: int = 400):
        super().__init__(message)
        self.status_code = status_code
        self.error_type = _HTTP_ERROR_TYPES.get(status_code, "validation" if status_code < 500 else "internal")


class InternalError(ServingError):
    """A bug: the server failed in a way no request should cause (the log has the traceback)."""

    status_code = 500
    error_type = "internal"
    outcome = None


class AdapterNotFoundError(ServingError):
    """The adapter id names nothing in the registry, or no route (LoRAX reports load failures as 424)."""

    outcome = "not_found"


class AdapterNotServableError(ServingError):
    """The adapter exists but fails the servability check."""

    outcome = "not_servable"


class AdapterRefusedError(AdapterNotServableError):
    """An adapter offered for registration fails the servability check (vLLM's load endpoint answers 400)."""

    status_code = 400


class NotFoundError(ServingError):
    """An admin or feedback call names something that is not there (not a loaded adapter, no request id)."""

    status_code = 404
    error_type = "not_found"
    outcome = None


class ConflictError(ServingError):
    """A call that contradicts what was already recorded (a second feedback score for the same request and metric)."""

    status_code = 409
    error_type = "conflict"
    outcome = None


class OverloadedError(ServingError):
    """The bounded request queue is full: retry later."""

    status_code = 429
    error_type = "overloaded"
    outcome = "overloaded"


class GenerationError(ServingError):
    """The engine failed while generating."""


class IncompleteGenerationError(ServingError):
    """Generation stopped before it finished (for example at server shutdown)."""

    status_code = 500
    error_type = "incomplete_generation"
    outcome = "incomplete"


class UpstreamError(ServingError):
    """No upstream of a route answered (the router tried every arm it may)."""

    status_code = 502
    error_type = "upstream"
    outcome = "upstream_error"


class UnhealthyError(ServingError):
    """The server is starting or stopping."""

    status_code = 503
    error_type = "healthcheck"
    outcome = None


class UnauthorizedError(ServingError):
    """No token was sent, or a client API key is missing or wrong."""

    status_code = 401
    error_type = "unauthorized"
    outcome = None


class ForbiddenError(ServingError):
    """A wrong admin token was sent, or the admin API is disabled."""

    status_code = 403
    error_type = "forbidden"
    outcome = None


def request_validation_error(error: RequestValidationError) -> ValidationError:
    """FastAPI's body validation failure as one ``ValidationError`` naming every bad field."""
    messages = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"] if part != "body")
        messages.append(f"{where or 'body'}: {problem['msg']}")
    return ValidationError("; ".join(messages))


def http_error(error: HTTPException, request: Request) -> ServingError:
    """A framework-raised HTTP error (no such path, wrong method, unreadable body) as a ``ServingError``."""
    status = error.status_code
    where = f"{request.method} {request.url.path}"
    if status == 404:
        message = f"{where}: no such route; /openapi.json lists them"
    elif status == 405:
        allowed = {k.lower(): v for k, v in (error.headers or {}).items()}.get("allow", "another method")
        message = f"{where}: method not allowed; use {allowed}"
    else:
        message = f"{where}: {error.detail or HTTPStatus(status).phrase}"
    return FrameworkError(message, status)


def install_error_handlers(app: FastAPI, on_invalid_body: Callable[[Request], None] | None = None) -> None:
    """Answer every error of ``app`` as ``{"error", "error_type"}``: ``ServingError``s, framework errors, bugs.

    ``on_invalid_body`` is told about bodies FastAPI refused before a handler ran (the server
    counts them, as no handler did). A bug answers 500 ``internal`` without its traceback.
    """

    async def serving_error(request: Request, error: ServingError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status_code)

    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        if on_invalid_body is not None:
            on_invalid_body(request)
        return await serving_error(request, request_validation_error(error))

    async def framework_error(request: Request, error: HTTPException) -> JSONResponse:
        response = await serving_error(request, http_error(error, request))
        response.headers.update(error.headers or {})  # e.g. the Allow header of a 405
        return response

    async def bug(request: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises the error after this answer, so uvicorn logs its traceback.
        return await serving_error(request, InternalError("internal server error; the server log has the details"))

    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, framework_error)
    app.add_exception_handler(Exception, bug)
