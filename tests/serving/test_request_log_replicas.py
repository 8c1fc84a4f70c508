"""Router replicas sharing one PostgreSQL request log: real `stillhouse route` processes under concurrent traffic.

Every acknowledged exchange lands exactly once whichever replica answered it, feedback sent to
either replica joins it, training reads what both wrote, and a database outage costs rows, not answers.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from abtest.echo_upstream import create_echo_upstream
from monitoring import catalog
from serving.loopback import free_port
from serving.request_log import open_store
from tests.abtest.harness import running, running_router
from tests.serving.postgres_harness import postgres_server, postgres_url  # noqa: F401  (fixtures)
from training import dataset
from training.config import DataConfig, LogFilter
from training.task import load_task

TASK = load_task("demo")
REQUESTS = 240


def write_traffic(path: Path, teacher_url: str, student_url: str) -> Path:
    """A passthrough route: clients send the task's teacher prompt, so the log holds training rows."""
    route = {
        "mode": "passthrough",
        "metrics": {"thumbs": {"type": "boolean", "goal": "maximize"}},
        "arms": {
            "teacher": {"role": "control", "upstream": teacher_url, "adapter": None, "weight": 50, "fallback": True},
            "student": {"role": "candidate", "upstream": student_url, "adapter": "s@v1", "weight": 50},
        },
    }
    config = {"version": 1, "salt": "replicas", "sticky": {"header": "X-User-Id"}, "default_upstream": teacher_url, "routes": {"sentiment": route}}
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def router_process(config: Path, request_log: str, log_path: Path):
    """`python -m stillhouse route` on a free port, logging to ``request_log``; yields its URL, stops it with SIGTERM."""
    port = free_port()
    stderr = log_path.open("w")
    child = subprocess.Popen(
        [sys.executable, "-m", "stillhouse", "route", "--config", str(config), "--port", str(port), "--request-log", request_log],
        stdout=subprocess.DEVNULL, stderr=stderr,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert child.poll() is None, f"the router exited: {log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the router did not start: {log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        yield url
    finally:
        child.terminate()  # uvicorn's shutdown closes the request log, which writes every accepted row
        try:
            child.wait(timeout=60)
        finally:
            stderr.close()


def ask(client: httpx.Client, url: str, i: int) -> tuple[int, str, str]:
    """One LoRAX call for review ``i``: (status, request id, arm)."""
    body = {"inputs": TASK.teacher_prompt({"review": f"review {i}"}), "parameters": {"adapter_id": "sentiment", "max_new_tokens": 4}}
    response = client.post(f"{url}/generate", json=body, headers={"X-User-Id": f"u{i}"})
    return response.status_code, response.headers.get("x-request-id", ""), response.headers.get("x-stillhouse-arm", "")


def test_two_router_replicas_share_one_postgres_log(tmp_path, postgres_url):
    with ExitStack() as stack:
        teacher = stack.enter_context(running(create_echo_upstream("t")))
        student = stack.enter_context(running(create_echo_upstream("s")))
        config = write_traffic(tmp_path / "traffic.yaml", teacher.url, student.url)
        # Both start on an empty database at once: each creates the schema if absent.
        replicas = [stack.enter_context(router_process(config, postgres_url, tmp_path / f"router{n}.log")) for n in range(2)]
        client = stack.enter_context(httpx.Client(timeout=30, limits=httpx.Limits(max_connections=32)))
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: (i, *ask(client, replicas[i % 2], i)), range(REQUESTS)))
        assert [status for _, status, _, _ in answers] == [200] * REQUESTS
        served = {request_id: (i, arm) for i, _, request_id, arm in answers}
        assert len(served) == REQUESTS and {arm for _, arm in served.values()} == {"teacher", "student"}

        # Feedback reaches a replica that may not have answered: it finds the arm in the shared log.
        store = open_store(postgres_url)
        deadline = time.monotonic() + 30
        while len(store.query(source="router")) < REQUESTS:
            assert time.monotonic() < deadline, "the replicas never wrote every exchange"
            time.sleep(0.2)
        store.close()
        for request_id, (i, arm) in served.items():
            other = replicas[(i + i // 2) % 2]  # half to the replica that answered, half to the other one
            answer = client.post(f"{other}/feedback", json={"request_id": request_id, "metric": "thumbs", "value": i % 3 == 0})
            assert answer.status_code == 200 and answer.json()["arm"] == arm, answer.text
    # Both replicas stopped: every accepted row and feedback is written.

    store = open_store(postgres_url)
    logged = store.query(source="router")
    store.close()
    assert Counter(r.exchange.request_id for r in logged) == Counter(list(served))  # each acknowledged exchange exactly once
    for row in logged:
        i, arm = served[row.exchange.request_id]
        assert row.exchange.arm == arm and row.exchange.route == "sentiment" and row.exchange.status == 200
        assert row.feedback == {"thumbs": 1.0 if i % 3 == 0 else 0.0}

    liked = dataset.load_rows(TASK, DataConfig(
        source=f"request-log:{postgres_url}", log_filter=LogFilter(route="sentiment", arm="student", min_feedback={"thumbs": 1}),
    ))
    expected = {request_id: i for request_id, (i, arm) in served.items() if arm == "student" and i % 3 == 0}
    assert sorted(row.id for row in liked) == sorted(expected) and expected
    for row in liked:
        assert row.inputs == {"review": f"review {expected[row.id]}"}
        assert row.output == f"s|s@v1|{TASK.teacher_prompt(row.inputs)}".strip()


def test_a_router_keeps_serving_through_a_database_outage(tmp_path, postgres_server, postgres_url):
    with running(create_echo_upstream("t")) as teacher, running(create_echo_upstream("s")) as student:
        config = write_traffic(tmp_path / "traffic.yaml", teacher.url, student.url)
        with running_router(config, request_log=postgres_url) as (url, router), httpx.Client(timeout=10) as client:
            assert ask(client, url, 0)[0] == 200
            with postgres_server.stopped():
                started = time.perf_counter()
                assert [ask(client, url, i)[0] for i in range(1, 41)] == [200] * 40
                assert time.perf_counter() - started < 20
                router.request_log.flush()
                metrics = client.get(f"{url}/metrics").text
            dropped = f'{catalog.REQUEST_LOG_DROPPED_ROWS.name}{{component="router"}} {float(router.request_log.dropped)}'
            assert router.request_log.dropped >= 40 and dropped in metrics
            back, store = time.time(), open_store(postgres_url)
            deadline = time.monotonic() + 30
            while True:  # the writer reconnects on its own
                assert ask(client, url, 99)[0] == 200
                router.request_log.flush()
                if store.query(since=back):
                    break
                assert time.monotonic() < deadline, "the router never logged again after the database came back"
                time.sleep(0.2)
            store.close()


def test_the_training_source_refuses_an_unreachable_database_without_showing_its_password(tmp_path):
    with pytest.raises(dataset.DatasetError, match=r"data.source: cannot reach the PostgreSQL database postgresql://u:\*\*\*@") as raised:
        dataset.load_rows(TASK, DataConfig(source=f"request-log:postgresql://u:s3cret@127.0.0.1:{free_port()}/requests"))
    assert "s3cret" not in str(raised.value)
    with pytest.raises(dataset.DatasetError, match="no such file; pass the SQLite file or the postgresql:// URL"):
        dataset.load_rows(TASK, DataConfig(source=f"request-log:{tmp_path / 'missing.db'}"))
