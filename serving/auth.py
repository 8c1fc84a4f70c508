"""Bearer tokens for the server's and the router's admin APIs and the router's client API keys.

Tokens are compared with ``hmac.compare_digest`` so the time a check takes says nothing about
how much of a guess was right.
"""

from __future__ import annotations

import hmac
from typing import Callable, Collection

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.requests import HTTPConnection

from serving.errors import ForbiddenError, UnauthorizedError


def bearer_token(connection: HTTPConnection) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or ``None`` without one."""
    header = connection.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def _matches(token: str, expected: str) -> bool:
    return hmac.compare_digest(token.encode(), expected.encode())


def check_admin(connection: HTTPConnection, admin_token: str | None, *, command: str) -> None:
    """Refuse an admin call: 401 without a bearer token, 403 with a wrong one or when none is set.

    ``command`` names what to restart with ``--admin-token`` (``server`` or ``router``).
    """
    if not admin_token:
        raise ForbiddenError(f"the admin API is disabled; start the {command} with --admin-token TOKEN")
    token = bearer_token(connection)
    if token is None:
        raise UnauthorizedError("send the admin token as `Authorization: Bearer TOKEN`")
    if not _matches(token, admin_token):
        raise ForbiddenError("wrong admin token")


def is_admin(connection: HTTPConnection, admin_token: str | None) -> bool:
    """The call carries the admin token (False when the admin API is disabled)."""
    token = bearer_token(connection)
    return bool(admin_token) and token is not None and _matches(token, admin_token)


def admin_route(admin_token: str | None, *, command: str) -> type[APIRoute]:
    """A route class that checks the admin token (``check_admin``) before the body is read or validated.

    A caller without the token learns nothing about the body a route expects: 401/403 comes first.
    """

    class AdminRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def checked(request: Request) -> Response:
                check_admin(request, admin_token, command=command)
                return await handler(request)

            return checked

    return AdminRoute


def check_api_key(connection: HTTPConnection, api_keys: Collection[str]) -> None:
    """When client API keys are configured, refuse a call without one of them (401)."""
    if not api_keys:
        return
    token = bearer_token(connection)
    if token is None or not any(_matches(token, key) for key in api_keys):
        raise UnauthorizedError("send a valid API key as `Authorization: Bearer KEY`")
