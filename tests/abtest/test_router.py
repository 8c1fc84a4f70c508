"""Router mechanics against stub upstreams on loopback: routing, fallback, reload, feedback, admin."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import yaml

from abtest.echo_upstream import create_echo_upstream
from serving.loopback import free_port
from serving.request_log import SQLiteStore
from tests.abtest.harness import running, running_router

ADMIN = "admin-s3cret"


def sample(metrics: str, series: str) -> float:
    """The value of one exported series (every series of a route exists from the start, at 0)."""
    match = re.search(re.escape(series) + r" (\S+)", metrics)
    assert match, f"{series} is not exported"
    return float(match.group(1))


def write_config(path, teacher_url, student_url, **route_overrides):
    route = {
        "mode": "template",
        "input": "text",
        "metrics": {"correct": {"type": "boolean", "goal": "maximize"}, "rating": {"type": "float", "goal": "maximize"}},
        "arms": {
            "teacher": {"role": "control", "upstream": teacher_url, "adapter": None, "template": "T: {{text}}", "weight": 50, "fallback": True},
            "student": {"role": "candidate", "upstream": student_url, "adapter": "s@v1", "template": "{{text}}", "weight": 50, "timeout_s": 5},
        },
        **route_overrides,
    }
    config = {"version": 1, "salt": "exp", "sticky": {"header": "X-User-Id"}, "default_upstream": teacher_url, "routes": {"sentiment": route}}
    path.write_text(yaml.safe_dump(config))
    return config


@pytest.fixture()
def stubs():
    with running(create_echo_upstream("t")) as teacher, running(create_echo_upstream("s")) as student:
        yield teacher, student


@pytest.fixture()
def routed(tmp_path, stubs):
    teacher, student = stubs
    write_config(tmp_path / "traffic.yaml", teacher.url, student.url)
    with running_router(tmp_path / "traffic.yaml", admin_token=ADMIN, request_log=tmp_path / "log.db") as (url, router):
        yield url, router, tmp_path


CLIENT = httpx.Client(timeout=10)  # keep-alive, as real clients do


def generate(url, user, **extra):
    body = {"inputs": "great", "parameters": {"adapter_id": "sentiment", "max_new_tokens": 4}}
    return CLIENT.post(f"{url}/generate", json=body, headers={"X-User-Id": user, **extra})


def test_each_arm_gets_its_adapter_and_template(routed):
    url, _, _ = routed
    arms = {}
    for user in range(40):
        response = generate(url, f"u{user}")
        assert response.status_code == 200
        assert response.headers["x-stillhouse-route"] == "sentiment"
        assert len(response.headers["x-request-id"]) == 32
        arms[response.headers["x-stillhouse-arm"]] = response.json()["generated_text"]
    assert arms == {"teacher": "t||T: great", "student": "s|s@v1|great"}


def test_sticky_units_and_pinning(routed):
    url, _, _ = routed
    first = {u: generate(url, f"u{u}").headers["x-stillhouse-arm"] for u in range(20)}
    assert first == {u: generate(url, f"u{u}").headers["x-stillhouse-arm"] for u in range(20)}
    pinned = generate(url, "u0", **{"x-stillhouse-arm": "student"})
    assert pinned.headers["x-stillhouse-arm"] == "student"


def test_other_adapter_ids_pass_through_to_the_default_upstream(routed):
    url, _, _ = routed
    response = httpx.post(f"{url}/generate", json={"inputs": "x", "parameters": {"adapter_id": "other@v2"}})
    assert response.json()["generated_text"] == "t|other@v2|x"
    assert response.headers["x-stillhouse-route"] == "__passthrough__"


def test_openai_client_and_streams_through_the_router(routed):
    url, _, _ = routed
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", default_headers={"X-User-Id": "u1"})
    completion = client.completions.create(model="sentiment", prompt="nice", max_tokens=4)
    arm_text = completion.choices[0].text
    assert arm_text in ("t||T: nice", "s|s@v1|nice")
    chat = client.chat.completions.create(model="sentiment", messages=[{"role": "user", "content": "nice"}], max_tokens=4)
    assert chat.choices[0].message.content == arm_text
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="sentiment", messages=[{"role": "user", "content": "nice"}], max_tokens=4, stream=True) if c.choices]
    assert "".join(pieces) == arm_text
    with httpx.stream("POST", f"{url}/generate_stream", json={"inputs": "nice", "parameters": {"adapter_id": "sentiment"}},
                      headers={"X-User-Id": "u1"}) as response:
        assert response.headers["x-stillhouse-arm"] in ("teacher", "student")
        assert '"generated_text": "' + arm_text in response.read().decode()


def test_feedback_is_joined_to_the_arm_and_exported(routed):
    url, router, tmp_path = routed
    by_arm = {}
    for user in range(30):
        response = generate(url, f"u{user}")
        by_arm.setdefault(response.headers["x-stillhouse-arm"], []).append(response.headers["x-request-id"])
    for arm, ids in by_arm.items():
        for request_id in ids:
            answer = CLIENT.post(f"{url}/feedback", json={"request_id": request_id, "metric": "rating", "value": 2.0})
            assert answer.status_code == 200 and answer.json()["arm"] == arm
    assert CLIENT.post(f"{url}/feedback", json={"request_id": by_arm["teacher"][0], "metric": "correct", "value": True}).status_code == 200
    assert CLIENT.post(f"{url}/feedback", json={"request_id": by_arm["teacher"][0], "metric": "correct", "value": 0.5}).status_code == 422
    assert CLIENT.post(f"{url}/feedback", json={"request_id": by_arm["teacher"][0], "metric": "bleu", "value": 1}).status_code == 422
    assert CLIENT.post(f"{url}/feedback", json={"request_id": "f" * 32, "metric": "rating", "value": 1}).status_code == 404
    metrics = httpx.get(f"{url}/metrics").text
    n = len(by_arm["student"])
    assert f'stillhouse_router_feedback_count_total{{arm="student",metric="rating",route="sentiment"}} {float(n)}' in metrics
    assert f'stillhouse_router_feedback_sum_squares_total{{arm="student",metric="rating",route="sentiment"}} {4.0 * n}' in metrics
    assert f'stillhouse_router_feedback_sum_positive_total{{arm="student",metric="rating",route="sentiment"}} {2.0 * n}' in metrics
    assert 'stillhouse_router_feedback_sum_negative_total{arm="student",metric="rating",route="sentiment"} 0.0' in metrics
    router.request_log.flush()
    rows = SQLiteStore(tmp_path / "log.db").query(route="sentiment", arm="student", min_feedback={"rating": 2})
    assert sorted(r.exchange.request_id for r in rows) == sorted(by_arm["student"])


def test_admin_api(routed):
    url, _, _ = routed
    assert httpx.get(f"{url}/admin/config").status_code == 401
    assert httpx.get(f"{url}/admin/config", headers={"Authorization": "Bearer nope"}).status_code == 403
    auth = {"Authorization": f"Bearer {ADMIN}"}
    before = httpx.get(f"{url}/admin/config", headers=auth).json()
    assert before["config"]["routes"]["sentiment"]["arms"]["student"]["weight"] == 50
    refused = httpx.post(f"{url}/admin/weights", json={"route": "sentiment", "weights": {"ghost": 1}}, headers=auth)
    assert refused.status_code == 422
    done = httpx.post(f"{url}/admin/weights", json={"route": "sentiment", "weights": {"teacher": 0, "student": 1}}, headers=auth)
    assert done.status_code == 200 and done.json()["version"] != before["version"]
    assert {generate(url, f"u{u}").headers["x-stillhouse-arm"] for u in range(10)} == {"student"}


def test_hot_reload_keeps_serving_and_refuses_bad_files(routed, stubs):
    url, router, tmp_path = routed
    teacher, student = stubs
    config = write_config(tmp_path / "traffic.yaml", teacher.url, student.url)
    config["routes"]["sentiment"]["arms"]["student"]["weight"] = 0
    (tmp_path / "traffic.yaml").write_text(yaml.safe_dump(config))
    deadline = time.monotonic() + 10
    while router.holder.config.routes["sentiment"].arms["student"].weight != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert {generate(url, f"u{u}").headers["x-stillhouse-arm"] for u in range(10)} == {"teacher"}
    version = router.holder.config.version_hash
    (tmp_path / "traffic.yaml").write_text("version: 2\nsalt: ''\nroutes: {sentiment: {arms: {}}}\n")
    deadline = time.monotonic() + 10
    while "stillhouse_router_config_reload_errors_total 1.0" not in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert router.holder.config.version_hash == version
    assert generate(url, "u1").status_code == 200
    assert f'stillhouse_router_config_info{{version="{version}"}} 1.0' in httpx.get(f"{url}/metrics").text


def test_killed_candidate_upstream_mid_traffic(tmp_path):
    """The candidate's upstream dies under load: no client sees an error, every request is logged."""
    with running(create_echo_upstream("t")) as teacher:
        student = running(create_echo_upstream("s")).start()
        config = write_config(tmp_path / "traffic.yaml", teacher.url, student.url)
        config["routes"]["sentiment"]["arms"]["student"]["timeout_s"] = 1  # a hung connection costs at most 1 s
        (tmp_path / "traffic.yaml").write_text(yaml.safe_dump(config))
        with running_router(tmp_path / "traffic.yaml", request_log=tmp_path / "log.db") as (url, router):
            statuses, request_ids = [], []
            lock = threading.Lock()

            def one(i: int):
                if i == 60:
                    threading.Thread(target=student.stop).start()  # kill the candidate mid-traffic
                response = generate(url, f"u{i % 50}")
                with lock:
                    statuses.append(response.status_code)
                    request_ids.append(response.headers["x-request-id"])
                return response.headers["x-stillhouse-arm"]

            with ThreadPoolExecutor(8) as pool:
                arms = list(pool.map(one, range(200)))
            metrics = httpx.get(f"{url}/metrics").text
        # Leaving the router's context closed its log, so every accepted row is on disk.
        assert statuses == [200] * 200
        assert "student" in arms[:40] and arms[-40:].count("student") == 0
        rows = SQLiteStore(tmp_path / "log.db").query()
        assert sorted(r.exchange.request_id for r in rows) == sorted(request_ids)
        fallbacks = [r for r in rows if r.exchange.fallback_from == "student"]
        assert fallbacks and all(r.exchange.arm == "teacher" and r.exchange.outcome == "fallback" for r in fallbacks)
        assert sample(metrics, 'stillhouse_router_fallbacks_total{arm="student",fallback="teacher",route="sentiment"}') == len(fallbacks)
        assert sample(metrics, 'stillhouse_router_upstream_errors_total{arm="student",reason="circuit_open",route="sentiment"}') > 0


def test_shadow_traffic_is_compared_and_logged(tmp_path, stubs):
    teacher, student = stubs
    config = write_config(tmp_path / "traffic.yaml", teacher.url, student.url, shadow=[{"arm": "mirror", "fraction": 1.0}])
    arms = config["routes"]["sentiment"]["arms"]
    arms["teacher"]["weight"], arms["student"]["weight"] = 1, 0
    arms["mirror"] = {"role": "candidate", "upstream": teacher.url, "template": "T: {{text}}", "weight": 0}
    (tmp_path / "traffic.yaml").write_text(yaml.safe_dump(config))
    with running_router(tmp_path / "traffic.yaml", request_log=tmp_path / "log.db") as (url, router):
        served = [generate(url, f"u{u}").headers["x-request-id"] for u in range(5)]
        deadline = time.monotonic() + 10
        while 'stillhouse_router_shadow_requests_total{agreement="agree",arm="mirror",route="sentiment"} 5.0' not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    rows = SQLiteStore(tmp_path / "log.db").query(include_shadow=True, arm="mirror")
    assert sorted(r.exchange.shadow_of for r in rows) == sorted(served)
    assert all(r.exchange.shadow_agreement for r in rows)


def test_client_keys_and_size_limit(tmp_path, stubs):
    teacher, student = stubs
    write_config(tmp_path / "traffic.yaml", teacher.url, student.url)
    with running_router(tmp_path / "traffic.yaml", api_keys=frozenset({"k1"}), max_body_bytes=200) as (url, _):
        assert generate(url, "u").status_code == 401
        assert generate(url, "u", Authorization="Bearer k2").status_code == 401
        assert generate(url, "u", Authorization="Bearer k1").status_code == 200
        big = {"inputs": "x" * 500, "parameters": {"adapter_id": "sentiment"}}
        assert httpx.post(f"{url}/generate", json=big, headers={"Authorization": "Bearer k1"}).status_code == 413


def test_metrics_have_the_documented_names(routed):
    url, _, _ = routed
    generate(url, "u1")
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("stillhouse_router_requests_total", "stillhouse_router_request_duration_seconds_bucket",
                 "stillhouse_router_time_to_first_token_seconds_bucket", "stillhouse_router_prompt_tokens_total",
                 "stillhouse_router_generated_tokens_total", "stillhouse_router_config_info",
                 'stillhouse_request_log_dropped_rows_total{component="router"}'):
        assert name in metrics, name
    assert "x-request-id" not in metrics and "u1" not in metrics


def test_streams_fall_back_before_the_first_byte(tmp_path, stubs):
    teacher, _ = stubs
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    write_config(tmp_path / "traffic.yaml", teacher.url, dead)
    with running_router(tmp_path / "traffic.yaml") as (url, _):
        body = {"inputs": "hi", "parameters": {"adapter_id": "sentiment"}}
        with CLIENT.stream("POST", f"{url}/generate_stream", json=body, headers={"x-stillhouse-arm": "student"}) as response:
            assert response.status_code == 200 and response.headers["x-stillhouse-arm"] == "teacher"
            assert '"generated_text": "t||T: hi"' in response.read().decode()
        metrics = CLIENT.get(f"{url}/metrics").text
    assert 'stillhouse_router_requests_total{arm="teacher",outcome="fallback",route="sentiment"} 1.0' in metrics
    assert 'stillhouse_router_upstream_errors_total{arm="student",reason="connect",route="sentiment"} 1.0' in metrics


def test_every_refusal_has_the_lorax_error_shape(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: every arm fails
    config = write_config(tmp_path / "traffic.yaml", dead, dead)
    del config["default_upstream"]
    (tmp_path / "traffic.yaml").write_text(yaml.safe_dump(config))
    with running_router(tmp_path / "traffic.yaml", admin_token=ADMIN, api_keys=frozenset({"k1"}), max_body_bytes=300) as (url, _):
        key = {"Authorization": "Bearer k1"}
        routed = {"inputs": "x", "parameters": {"adapter_id": "sentiment"}}
        refusals = [
            (401, "unauthorized", CLIENT.post(f"{url}/generate", json=routed)),
            (401, "unauthorized", CLIENT.get(f"{url}/admin/config")),
            (403, "forbidden", CLIENT.get(f"{url}/admin/config", headers=key)),
            (413, "validation", CLIENT.post(f"{url}/generate", json={**routed, "inputs": "x" * 500}, headers=key)),
            (422, "validation", CLIENT.post(f"{url}/generate", content=b"{not json", headers=key)),
            (422, "validation", CLIENT.post(f"{url}/generate", json=[routed], headers=key)),
            (422, "validation", CLIENT.post(f"{url}/feedback", json={"request_id": "f" * 32}, headers=key)),
            (404, "not_found", CLIENT.post(f"{url}/feedback", json={"request_id": "f" * 32, "metric": "rating", "value": 1}, headers=key)),
            (424, "generation", CLIENT.post(f"{url}/generate", json={"inputs": "x", "parameters": {"adapter_id": "other"}}, headers=key)),
            (502, "upstream", CLIENT.post(f"{url}/generate", json=routed, headers=key)),
        ]
        for status, error_type, response in refusals:
            assert response.status_code == status, response.text
            body = response.json()
            assert set(body) == {"error", "error_type"} and body["error_type"] == error_type and body["error"]
