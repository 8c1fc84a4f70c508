"""Fuzz every route of the router over real HTTP: no answer is a 5xx, every refusal has the LoRAX shape.

Two sources of cases, both seeded: schemathesis over the router's own ``/openapi.json``, and, as
the router parses raw JSON (its OpenAPI document describes no request bodies), hypothesis-made
JSON bodies for each route, built around the fields the route reads.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abtest.echo_upstream import create_echo_upstream
from serving.protocol import GENERATION_PATHS
from tests.abtest.harness import running, running_router
from tests.abtest.test_router import write_config
from tests.schema_fuzz import FuzzReport, fuzz

ADMIN = "admin-s3cret"
BIG = "__1e400__"  # stands for the literal 1e400 (Python's json reads it as inf; json.dumps cannot write it)


def send(report: FuzzReport, client: httpx.Client, method: str, url: str, content: bytes | None = None, **kwargs) -> None:
    """Send one request and check its answer."""
    request = f"{method} {url} {str(content)[:160]}"
    try:
        response = client.request(method, url, content=content, **kwargs)
    except httpx.TransportError as error:
        report.dropped(request, error)
        return
    report.check(request, response.status_code, response.content)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The router splitting `sentiment` between two echo upstreams, logging, with an admin token; a few served ids."""
    root = tmp_path_factory.mktemp("fuzz")
    with running(create_echo_upstream("t")) as teacher, running(create_echo_upstream("s")) as student:
        write_config(root / "traffic.yaml", teacher.url, student.url)
        with running_router(root / "traffic.yaml", admin_token=ADMIN, request_log=root / "log.db") as (url, router):
            with httpx.Client(base_url=url, timeout=30) as client:
                served = [client.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "sentiment"}},
                                      headers={"X-User-Id": f"u{i}"}).headers["x-request-id"] for i in range(4)]
                yield url, client, served


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
NUMBERS = st.integers() | st.floats() | st.sampled_from([2**64, 10**400, -1, 0, 1e308, -1e308, BIG])
ROUTE_KEYS = st.sampled_from(["sentiment", "other@v1"]) | JSON


def _optional(**fields) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({}, optional=fields)


def _bodies(path: str, served: list[str]) -> st.SearchStrategy:
    """Bodies for ``path``: mostly its own fields with odd values, sometimes any JSON at all."""
    sampling = _optional(max_new_tokens=NUMBERS | JSON, seed=NUMBERS, temperature=NUMBERS, details=JSON, stream=JSON)
    if path in ("/", "/generate", "/generate_stream"):
        parameters = st.fixed_dictionaries({}, optional={"adapter_id": ROUTE_KEYS}).flatmap(
            lambda base: sampling.map(lambda extra: {**base, **extra})) | JSON
        shaped = st.fixed_dictionaries({"inputs": st.text(max_size=20) | JSON}, optional={"parameters": parameters, "stream": JSON})
    elif path == "/v1/completions":
        shaped = st.fixed_dictionaries({"model": ROUTE_KEYS, "prompt": st.text(max_size=20) | JSON},
                                       optional={"stream": st.booleans() | JSON, "max_tokens": NUMBERS, "seed": NUMBERS})
    elif path == "/v1/chat/completions":
        message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]) | JSON, "content": st.text(max_size=20) | JSON})
        shaped = st.fixed_dictionaries({"model": ROUTE_KEYS, "messages": st.lists(message, max_size=3) | JSON},
                                       optional={"stream": st.booleans() | JSON, "seed": NUMBERS})
    elif path == "/feedback":
        shaped = st.fixed_dictionaries({"request_id": st.sampled_from(served) | JSON,
                                        "metric": st.sampled_from(["correct", "rating", "bleu"]) | JSON, "value": NUMBERS | JSON})
    else:  # /admin/weights
        weights = st.dictionaries(st.sampled_from(["teacher", "student", "ghost"]) | st.text(max_size=4), NUMBERS | JSON, max_size=2)
        shaped = st.fixed_dictionaries({"route": st.sampled_from(["sentiment", "ghost"]) | JSON, "weights": weights | JSON})
    return st.one_of(shaped, shaped, shaped, JSON)


def _encode(body: object) -> bytes:
    return json.dumps(body).replace(f'"{BIG}"', "1e400").encode()


POST_PATHS = sorted(GENERATION_PATHS) + ["/feedback", "/admin/weights"]
ODD_BODIES = [b"", b"{", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000, b'{"inputs": "x", "parameters": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001 + b"}",
              b"NaN", b'"text"', b"1e400"]


@pytest.mark.parametrize("path", POST_PATHS)
def test_random_json_bodies(stack, path):
    url, client, served = stack
    report = FuzzReport()
    headers = {"content-type": "application/json", "authorization": f"Bearer {ADMIN}"}

    @settings(max_examples=45, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=_bodies(path, served), user=st.from_regex(r"[A-Za-z0-9_.-]{0,8}", fullmatch=True))
    def one(body, user):
        send(report, client, "POST", path, _encode(body), headers={**headers, "X-User-Id": user})

    one()
    for content in ODD_BODIES:
        send(report, client, "POST", path, content, headers=headers)
    print(report.summary())
    assert not report.server_errors and not report.shape_violations, report.summary()


def test_schema_fuzz(stack):
    """schemathesis over ``/openapi.json``: every operation, valid and invalid cases, undeclared methods, unknown paths."""
    url, _, _ = stack
    for headers in ({"authorization": f"Bearer {ADMIN}"}, None):  # with and without the admin token
        report = fuzz(url, headers=headers, examples=6)
        print(report.summary())
        assert report.requests > 40
        assert not report.server_errors and not report.shape_violations, report.summary()
