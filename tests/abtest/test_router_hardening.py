"""What no client can do to the router: make it answer 500, open a route's breakers, poison its metrics or its reloads."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import lorax
import openai
import pytest
import yaml
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from abtest.echo_upstream import create_echo_upstream
from serving.loopback import ThreadedServer, free_port
from serving.request_log import SQLiteStore
from tests.abtest.harness import dying_mid_stream, fragile, running, running_router
from tests.abtest.test_router import ADMIN, sample, write_config

J = {"content-type": "application/json"}
ROUTED = {"inputs": "great", "parameters": {"adapter_id": "sentiment"}}


def shaped(response: httpx.Response, status: int, error_type: str) -> str:
    """The error message of a LoRAX-shaped refusal, after checking its status and type."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    return body["error"]


def wait_for(condition, what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_no_arm_answered_is_a_logged_502(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    write_config(tmp_path / "traffic.yaml", dead, dead)
    with running_router(tmp_path / "traffic.yaml", request_log=tmp_path / "log.db") as (url, router):
        with httpx.Client(base_url=url, timeout=10) as client:
            plain = client.post("/generate", json=ROUTED, headers={"x-stillhouse-arm": "student"})
            streamed = client.post("/generate_stream", json=ROUTED)
            metrics = client.get("/metrics").text
    message = shaped(plain, 502, "upstream")
    assert "student: connect" in message and "teacher: connect" in message
    shaped(streamed, 502, "upstream")
    rows = SQLiteStore(tmp_path / "log.db").query()
    assert [(r.exchange.status, r.exchange.outcome, r.exchange.prompt) for r in rows] == [(502, "upstream_error", "great")] * 2
    assert sample(metrics, 'stillhouse_router_requests_total{arm="teacher",outcome="upstream_error",route="sentiment"}') == 2


@pytest.fixture()
def fragile_route(tmp_path):
    """Both arms on servers with input bugs (a plain 500 for a huge seed, 422 for `invalid`), counting their calls."""
    calls = {"t": 0, "s": 0}

    def counted(name):
        app = fragile(create_echo_upstream(name))

        @app.middleware("http")  # added last, so it runs first: every call is counted
        async def count(request, call_next):
            calls[name] += 1
            return await call_next(request)

        return app

    with running(counted("t")) as teacher, running(counted("s")) as student:
        write_config(tmp_path / "traffic.yaml", teacher.url, student.url)
        with running_router(tmp_path / "traffic.yaml", breaker_threshold=3, breaker_open_s=30) as (url, router):
            yield url, router, calls


def test_requests_that_break_every_arm_open_no_breaker(fragile_route):
    url, router, _ = fragile_route
    huge_seed = {"inputs": "great", "parameters": {"adapter_id": "sentiment", "seed": 18446744073709551616}}
    with httpx.Client(base_url=url, timeout=10) as client:
        for user in range(3):
            shaped(client.post("/generate", json=huge_seed, headers={"X-User-Id": f"u{user}"}), 502, "upstream")
        answers = [client.post("/generate", json=ROUTED, headers={"X-User-Id": f"u{user}"}) for user in range(10)]
    assert [a.status_code for a in answers] == [200] * 10
    assert {a.headers["x-stillhouse-arm"] for a in answers} == {"teacher", "student"}
    assert not router.breaker.is_open("sentiment/teacher") and not router.breaker.is_open("sentiment/student")


def test_a_refused_request_is_relayed_not_retried(fragile_route):
    url, router, calls = fragile_route
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(5):
            refused = client.post("/generate", json={**ROUTED, "inputs": "invalid"}, headers={"x-stillhouse-arm": "student"})
            assert shaped(refused, 422, "validation") == "inputs: invalid"
            assert refused.headers["x-stillhouse-arm"] == "student"
        assert calls == {"t": 0, "s": 5}
        assert client.post("/generate", json=ROUTED, headers={"x-stillhouse-arm": "student"}).headers["x-stillhouse-arm"] == "student"
        metrics = client.get("/metrics").text
    assert sample(metrics, 'stillhouse_router_requests_total{arm="student",outcome="client_error",route="sentiment"}') == 5
    assert sample(metrics, 'stillhouse_router_fallbacks_total{arm="student",fallback="teacher",route="sentiment"}') == 0


def test_an_arm_that_fails_what_another_answers_is_cut_off(tmp_path):
    broken = FastAPI()
    broken.add_api_route("/generate", lambda: PlainTextResponse("Internal Server Error", status_code=500), methods=["POST"])

    with running(create_echo_upstream("t")) as teacher, running(broken) as student:
        write_config(tmp_path / "traffic.yaml", teacher.url, student.url)
        with running_router(tmp_path / "traffic.yaml", breaker_threshold=3, breaker_open_s=30) as (url, router):
            with httpx.Client(base_url=url, timeout=10) as client:
                answers = [client.post("/generate", json=ROUTED, headers={"x-stillhouse-arm": "student"}) for _ in range(5)]
                metrics = client.get("/metrics").text
    assert [(a.status_code, a.headers["x-stillhouse-arm"]) for a in answers] == [(200, "teacher")] * 5
    assert router.breaker.is_open("sentiment/student")
    assert sample(metrics, 'stillhouse_router_upstream_errors_total{arm="student",reason="5xx",route="sentiment"}') == 3
    assert sample(metrics, 'stillhouse_router_upstream_errors_total{arm="student",reason="circuit_open",route="sentiment"}') == 2


def test_breaker_trips_and_recovers_under_load_with_no_client_error(tmp_path):
    """The candidate's upstream is stopped and restarted on its port under concurrent load: the fallback answers throughout."""
    port = free_port()
    with running(create_echo_upstream("t")) as teacher:
        student = running_on(create_echo_upstream("s"), port).start()
        config = write_config(tmp_path / "traffic.yaml", teacher.url, student.url)
        config["routes"]["sentiment"]["arms"]["student"]["timeout_s"] = 1
        (tmp_path / "traffic.yaml").write_text(yaml.safe_dump(config))
        with running_router(tmp_path / "traffic.yaml", breaker_threshold=3, breaker_open_s=0.3) as (url, router):
            statuses, arms, stop = [], [], threading.Event()

            def load(worker: int):
                with httpx.Client(base_url=url, timeout=10) as client:
                    i = 0
                    while not stop.is_set():
                        response = client.post("/generate", json=ROUTED, headers={"X-User-Id": f"w{worker}-{i % 20}"})
                        statuses.append(response.status_code)
                        arms.append(response.headers.get("x-stillhouse-arm"))
                        i += 1

            with ThreadPoolExecutor(8) as pool:
                workers = [pool.submit(load, w) for w in range(8)]
                wait_for(lambda: arms.count("student") > 20, "the candidate answering")
                student.stop()
                wait_for(lambda: router.breaker.is_open("sentiment/student"), "the candidate's breaker opening")
                before = len(arms)
                student = running_on(create_echo_upstream("s"), port).start()
                wait_for(lambda: arms[before:].count("student") > 20, "the candidate answering again")
                stop.set()
                [worker.result() for worker in workers]
            student.stop()
            metrics = httpx.get(f"{url}/metrics").text
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert sample(metrics, 'stillhouse_router_upstream_errors_total{arm="student",reason="circuit_open",route="sentiment"}') > 0
    assert sample(metrics, 'stillhouse_router_fallbacks_total{arm="student",fallback="teacher",route="sentiment"}') > 0


def running_on(app, port: int) -> ThreadedServer:
    """A server for ``app`` on a given port (a restarted upstream comes back where it was)."""
    return ThreadedServer(app, port=port, start_timeout_s=30, graceful_shutdown_s=1, stop_timeout_s=15)


def test_a_half_open_last_resort_lets_concurrent_requests_through(tmp_path):
    """A route's only arm comes back slowly: while its trial runs, the requests that have no other arm are tried, not refused."""
    port, delay = free_port(), [0.0]
    upstream = running_on(fragile(create_echo_upstream("t"), delay), port).start()
    config = write_config(tmp_path / "traffic.yaml", upstream.url, upstream.url)
    del config["routes"]["sentiment"]["arms"]["student"]
    (tmp_path / "traffic.yaml").write_text(yaml.safe_dump(config))
    with running_router(tmp_path / "traffic.yaml", breaker_threshold=2, breaker_open_s=0.2) as (url, router):
        upstream.stop()
        for _ in range(2):
            shaped(httpx.post(f"{url}/generate", json=ROUTED, timeout=10), 502, "upstream")
        assert router.breaker.is_open("sentiment/teacher")
        delay[0] = 0.5  # the first answers after a restart are slow: the trial is still running when the others arrive
        upstream = running_on(fragile(create_echo_upstream("t"), delay), port).start()
        wait_for(lambda: not router.breaker.is_open("sentiment/teacher"), "the open period to pass")
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: httpx.post(f"{url}/generate", json=ROUTED, timeout=10), range(8)))
        upstream.stop()
    assert [a.status_code for a in answers] == [200] * 8


@pytest.fixture()
def routed(tmp_path):
    with running(create_echo_upstream("t")) as teacher, running(create_echo_upstream("s")) as student:
        write_config(tmp_path / "traffic.yaml", teacher.url, student.url)
        with running_router(tmp_path / "traffic.yaml", admin_token=ADMIN, request_log=tmp_path / "log.db") as (url, router):
            with httpx.Client(base_url=url, timeout=10) as client:
                yield client, router, tmp_path


def test_inputs_that_used_to_answer_500(routed):
    client, _, _ = routed
    assert "parameters.adapter_id" in shaped(client.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": ["a"]}}), 422, "validation")
    assert "`model`" in shaped(client.post("/v1/completions", json={"model": {}, "prompt": "x"}), 422, "validation")
    assert "`model`" in shaped(client.post("/v1/chat/completions", json={"model": [1], "messages": []}), 422, "validation")
    for deep in (b"[" * 5000 + b"]" * 5000, b'{"inputs": "x", "parameters": {"adapter_id": "sentiment", "x": ' + b"[" * 500 + b"]" * 500 + b"}}"):
        for path in ("/generate", "/feedback", "/admin/weights"):
            answer = client.post(path, content=deep, headers={**J, "authorization": f"Bearer {ADMIN}"})
            assert "nests deeper than 64" in shaped(answer, 422, "validation")
    weights = client.post("/admin/weights", content=b'{"route": "sentiment", "weights": {"teacher": 1e400}}',
                          headers={**J, "authorization": f"Bearer {ADMIN}"})
    assert "weights.teacher" in shaped(weights, 422, "validation")
    weights = client.post("/admin/weights", content=b'{"route": "sentiment", "weights": {"teacher": 1' + b"0" * 400 + b"}}",
                          headers={**J, "authorization": f"Bearer {ADMIN}"})
    assert "weights.teacher" in shaped(weights, 422, "validation")


def test_feedback_is_bounded_and_the_first_score_wins(routed):
    client, router, tmp_path = routed
    request_id = client.post("/generate", json=ROUTED, headers={"x-stillhouse-arm": "student"}).headers["x-request-id"]

    def score(value: bytes | str, metric: str = '"rating"') -> httpx.Response:
        return client.post("/feedback", content=f'{{"request_id": "{request_id}", "metric": {metric}, "value": {value}}}', headers=J)

    for value in ("1e400", "1e308", "-1e308", "1000001", "1" + "0" * 400, "NaN", '"1"'):
        assert "between -1e+06 and 1e+06" in shaped(score(value), 422, "validation")
    assert "`metric` must be a string" in shaped(score("1", metric='["rating"]'), 422, "validation")
    assert "`request_id` must be a string" in shaped(client.post("/feedback", json={"request_id": [1], "metric": "rating", "value": 1}), 422, "validation")
    assert score("1e6").json()["value"] == 1e6
    again = score("2")
    assert "already has a rating score (1e+06)" in shaped(again, 409, "conflict")
    assert score("true", metric='"correct"').status_code == 200  # another metric of the same request is scored on its own
    metrics = client.get("/metrics").text
    labels = 'arm="student",metric="rating",route="sentiment"'
    assert sample(metrics, f"stillhouse_router_feedback_count_total{{{labels}}}") == 1
    assert sample(metrics, f"stillhouse_router_feedback_sum_positive_total{{{labels}}}") == 1e6
    assert sample(metrics, f"stillhouse_router_feedback_sum_squares_total{{{labels}}}") == 1e12
    router._served.clear()  # forgotten (a restart, or more than remembered_requests since): the log still knows
    assert "already has a rating score" in shaped(score("3"), 409, "conflict")
    assert "already has a correct score" in shaped(score("1", metric='"correct"'), 409, "conflict")
    router.request_log.flush()
    [row] = [r for r in SQLiteStore(tmp_path / "log.db").query() if r.exchange.request_id == request_id]
    assert row.feedback == {"rating": 1e6, "correct": 1.0}


def test_a_bad_traffic_file_never_stops_the_watcher(routed, caplog):
    client, router, tmp_path = routed
    path = tmp_path / "traffic.yaml"
    good = yaml.safe_load(path.read_text())
    version = router.holder.config.version_hash
    bad_files = [
        (b"version: 1\nsalt: \xff\xfe caf\xe9\n", "(file): byte 17 is not valid UTF-8"),
        (b"version: 1\nroutes: [unclosed\n", "(file): while parsing"),
        (yaml.safe_dump({**good, "salt": ""}).encode(), "salt: String should have at least 1 character"),
    ]
    caplog.set_level(logging.ERROR, logger="stillhouse.router")
    for count, (content, problem) in enumerate(bad_files, start=1):
        replace(path, content)
        wait_for(lambda: f"stillhouse_router_config_reload_errors_total {float(count)}" in client.get("/metrics").text, f"reload error {count}")
        assert router.holder.config.version_hash == version
        assert client.post("/generate", json=ROUTED).status_code == 200
        [record] = [r for r in caplog.records if problem in r.getMessage()]
        assert str(path) in record.getMessage() and f"keeping version {version}" in record.getMessage()
    good["routes"]["sentiment"]["arms"]["student"]["weight"] = 0
    replace(path, yaml.safe_dump(good).encode())
    wait_for(lambda: router.holder.config.version_hash != version, "the next valid edit to load")
    assert {client.post("/generate", json=ROUTED, headers={"X-User-Id": f"u{u}"}).headers["x-stillhouse-arm"] for u in range(10)} == {"teacher"}


def replace(path, content: bytes) -> None:
    """Swap a file's content in one step, as editors and `abtest watch` do (the watcher never sees half a file)."""
    staged = path.with_suffix(".staged")
    staged.write_bytes(content)
    os.replace(staged, path)


@pytest.mark.parametrize("clean_end", [False, True], ids=["upstream-dies", "ends-early"])
def test_a_stream_cut_after_its_first_byte_ends_with_an_error_event(tmp_path, clean_end):
    with running(dying_mid_stream(clean_end)) as upstream:
        write_config(tmp_path / "traffic.yaml", upstream.url, upstream.url)
        with running_router(tmp_path / "traffic.yaml", request_log=tmp_path / "log.db") as (url, router):
            with pytest.raises(lorax.errors.IncompleteGenerationError, match="the answer is incomplete"):
                list(lorax.Client(url).generate_stream("great", adapter_id="sentiment"))
            with httpx.stream("POST", f"{url}/generate_stream", json=ROUTED) as response:
                events = [line for line in response.iter_lines() if line.startswith("data:")]
            assert response.status_code == 200 and len(events) == 2
            assert '"error_type": "incomplete_generation"' in events[-1]
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.APIError, match="the answer is incomplete"):
                list(client.completions.create(model="sentiment", prompt="great", stream=True))
            metrics = httpx.get(f"{url}/metrics").text
    cut = 'stillhouse_router_upstream_errors_total{arm="%s",reason="cut",route="sentiment"}'
    assert sample(metrics, cut % "teacher") + sample(metrics, cut % "student") == 3
    rows = SQLiteStore(tmp_path / "log.db").query()
    assert [(r.exchange.status, r.exchange.outcome) for r in rows] == [(502, "upstream_error")] * 3
    assert all(r.exchange.output == "par" for r in rows)
