"""One set of error classes, one handler: every refusal is ``{"error", "error_type"}`` with its status."""

from __future__ import annotations

import inspect

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from monitoring.metrics import RouterMetrics, ServerMetrics
from serving import errors

# (class, HTTP status, LoRAX error_type, metric outcome): what clients and dashboards rely on
ERROR_CASES = [
    (errors.ServingError, 424, "generation", "generation"),
    (errors.ValidationError, 422, "validation", "validation"),
    (errors.PayloadTooLargeError, 413, "validation", "validation"),
    (errors.AdapterNotFoundError, 424, "generation", "not_found"),
    (errors.AdapterNotServableError, 424, "generation", "not_servable"),
    (errors.AdapterRefusedError, 400, "generation", "not_servable"),
    (errors.NotFoundError, 404, "not_found", None),
    (errors.ConflictError, 409, "conflict", None),
    (errors.OverloadedError, 429, "overloaded", "overloaded"),
    (errors.GenerationError, 424, "generation", "generation"),
    (errors.IncompleteGenerationError, 500, "incomplete_generation", "incomplete"),
    (errors.UpstreamError, 502, "upstream", "upstream_error"),
    (errors.UnhealthyError, 503, "healthcheck", None),
    (errors.UnauthorizedError, 401, "unauthorized", None),
    (errors.ForbiddenError, 403, "forbidden", None),
    (errors.FrameworkError, 400, "validation", None),
    (errors.InternalError, 500, "internal", None),
]


def test_every_error_class_is_in_the_table():
    defined = {c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.ServingError)}
    assert defined == {case[0] for case in ERROR_CASES}


@pytest.mark.parametrize("cls, status, error_type, outcome", ERROR_CASES)
def test_each_class_carries_its_status_type_and_a_known_outcome(cls, status, error_type, outcome):
    assert (cls.status_code, cls.error_type, cls.outcome) == (status, error_type, outcome)
    # the metrics refuse outcomes outside their vocabulary: the server's, or the router's for upstream errors
    if cls is errors.UpstreamError:
        RouterMetrics().observe_request("route", "arm", outcome)
    elif outcome is not None:
        ServerMetrics().observe_request("adapter", outcome)


class Body(BaseModel):
    count: int


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    invalid = []
    errors.install_error_handlers(app, on_invalid_body=invalid.append)

    @app.get("/raise/{name}")
    async def raise_error(name: str):
        raise getattr(errors, name)(f"{name} happened")

    @app.post("/body")
    async def body(body: Body):
        return body

    with TestClient(app) as test_client:
        test_client.invalid = invalid
        yield test_client


@pytest.mark.parametrize("cls, status, error_type, outcome", ERROR_CASES)
def test_the_handler_answers_every_class_in_the_lorax_shape(client, cls, status, error_type, outcome):
    response = client.get(f"/raise/{cls.__name__}")
    assert response.status_code == status
    assert response.json() == {"error": f"{cls.__name__} happened", "error_type": error_type}


def test_an_invalid_body_is_a_validation_error_naming_the_field(client):
    before = len(client.invalid)
    response = client.post("/body", json={"count": "many"})
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation" and response.json()["error"].startswith("count: ")
    assert len(client.invalid) == before + 1
    assert client.post("/body", content=b"{not json", headers={"content-type": "application/json"}).json()["error_type"] == "validation"


def test_framework_errors_and_bugs_answer_in_the_lorax_shape():
    app = FastAPI()
    errors.install_error_handlers(app)

    @app.post("/body")
    async def body(body: Body):
        return body

    @app.get("/bug")
    async def bug():
        raise RuntimeError("internal detail")

    with TestClient(app, raise_server_exceptions=False) as client:
        answers = {
            404: client.get("/nowhere"),
            405: client.get("/body"),
            400: client.post("/body", content=b"(\xfc\xfd", headers={"content-type": "application/json"}),
            500: client.get("/bug"),
        }
    for status, response in answers.items():
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error", "error_type"} and body["error"], body
    assert answers[404].json()["error_type"] == "not_found" and "/nowhere" in answers[404].json()["error"]
    assert "POST" in answers[405].json()["error"] and answers[405].headers["allow"] == "POST"
    assert answers[500].json()["error_type"] == "internal" and "internal detail" not in answers[500].text
