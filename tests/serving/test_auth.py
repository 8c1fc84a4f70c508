"""Bearer tokens: parsing, the admin check and client API keys."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from serving import auth
from serving.errors import ForbiddenError, UnauthorizedError


def request(authorization: str | None = None) -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization is not None else []
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers})


@pytest.mark.parametrize(
    "header, token",
    [(None, None), ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer", None), ("Bearer ", "")],
)
def test_bearer_token(header, token):
    assert auth.bearer_token(request(header)) == token


def test_admin_check():
    auth.check_admin(request("Bearer s3cret"), "s3cret", command="server")
    with pytest.raises(UnauthorizedError, match="Authorization: Bearer TOKEN"):
        auth.check_admin(request(), "s3cret", command="server")
    with pytest.raises(ForbiddenError, match="wrong admin token"):
        auth.check_admin(request("Bearer s3cre"), "s3cret", command="server")
    with pytest.raises(ForbiddenError, match="start the router with --admin-token"):
        auth.check_admin(request("Bearer s3cret"), None, command="router")


def test_api_keys():
    auth.check_api_key(request(), frozenset())  # no keys configured: open
    auth.check_api_key(request("Bearer k2"), frozenset({"k1", "k2"}))
    for header in (None, "Bearer k3", "k1"):
        with pytest.raises(UnauthorizedError, match="valid API key"):
            auth.check_api_key(request(header), frozenset({"k1"}))
