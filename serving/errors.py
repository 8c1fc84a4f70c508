"""Errors a client can cause, each mapped to LoRAX's ``error_type`` and HTTP status.

One exception class per failure kind, one handler in the server app: the body is always
``{"error": message, "error_type": type}``, which lorax-client maps to its own classes.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: a request the server refuses, with a LoRAX error type and status."""

    error_type = "generation"
    status_code = 424

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ValidationError(ServingError):
    """Bad parameters, an empty prompt, or a prompt longer than the model allows."""

    error_type = "validation"
    status_code = 422


class AdapterNotFoundError(ServingError):
    """The adapter id names nothing in the registry (LoRAX reports load failures as 424)."""

    error_type = "generation"
    status_code = 424


class AdapterNotServableError(ServingError):
    """The adapter exists but fails the servability check."""

    error_type = "generation"
    status_code = 424


class OverloadedError(ServingError):
    """The bounded request queue is full: retry later."""

    error_type = "overloaded"
    status_code = 429


class GenerationError(ServingError):
    """The engine failed while generating."""

    error_type = "generation"
    status_code = 424


class IncompleteGenerationError(ServingError):
    """Generation stopped before it finished (for example at server shutdown)."""

    error_type = "incomplete_generation"
    status_code = 500


class UnauthorizedError(ServingError):
    """No admin token was sent."""

    error_type = "unauthorized"
    status_code = 401


class ForbiddenError(ServingError):
    """A wrong admin token was sent, or the admin API is disabled."""

    error_type = "forbidden"
    status_code = 403
