"""The request log on real SQLite files: schema round trip, queries, concurrency, shutdown flush."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time

from serving.request_log import Exchange, Feedback, RequestLog, SQLiteStore, hash_unit, new_request_id


def exchange(**overrides) -> Exchange:
    values = dict(request_id=new_request_id(), prompt="Review: ok\nSentiment:", protocol="lorax", output=" positive")
    return Exchange(**{**values, **overrides})


def test_round_trip_keeps_every_field(tmp_path):
    row = exchange(
        route="sentiment", arm="student", adapter="s@v1", template_version="t1", config_version="c1",
        parameters={"max_new_tokens": 4, "stop": ["\n"]}, prompt_tokens=7, generated_tokens=2,
        latency_ms=12.5, ttft_ms=3.0, status=200, outcome="success", unit_hash=hash_unit("user-1"), source="router",
    )
    with RequestLog.open(tmp_path / "log.db") as request_log:
        assert request_log.record(row)
    [logged] = SQLiteStore(tmp_path / "log.db").query()
    assert logged.exchange == row
    assert logged.feedback == {}


def test_unit_ids_are_hashed_and_salted():
    assert hash_unit("alice") == hash_unit("alice")
    assert hash_unit("alice") != hash_unit("alice", salt="s")
    assert "alice" not in hash_unit("alice")


def test_wal_mode(tmp_path):
    SQLiteStore(tmp_path / "log.db").close()
    assert sqlite3.connect(tmp_path / "log.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_query_filters_and_feedback_join(tmp_path):
    store = SQLiteStore(tmp_path / "log.db")
    now = time.time()
    a = exchange(route="r", arm="a", adapter="x@v1", ts=now - 100)
    b = exchange(route="r", arm="b", adapter="y@v1", ts=now)
    c = exchange(route="other", arm="a", ts=now)
    shadow = exchange(route="r", arm="c", shadow_of=b.request_id, shadow_agreement=True, ts=now)
    store.write([a, b, c, shadow], [Feedback(a.request_id, "correct", 1), Feedback(b.request_id, "correct", 0),
                                    Feedback(b.request_id, "rating", 4), Feedback(b.request_id, "rating", 2)])
    ids = lambda rows: [r.exchange.request_id for r in rows]  # noqa: E731
    assert ids(store.query(route="r")) == [a.request_id, b.request_id]
    assert ids(store.query(route="r", arm="b")) == [b.request_id]
    assert ids(store.query(adapter="x@v1")) == [a.request_id]
    assert ids(store.query(since=now - 50)) == [b.request_id, c.request_id]
    assert ids(store.query(until=now - 50)) == [a.request_id]
    assert ids(store.query(min_feedback={"correct": 1})) == [a.request_id]
    assert ids(store.query(min_feedback={"rating": 3})) == [b.request_id]
    assert store.query(arm="b")[0].feedback == {"correct": 0, "rating": 3}
    [mirrored] = [r for r in store.query(include_shadow=True) if r.exchange.shadow_of]
    assert mirrored.exchange.shadow_agreement is True
    assert store.arm_of(b.request_id).arm == "b"
    assert store.arm_of("missing") is None


def test_arm_of_prefers_the_router_row(tmp_path):
    store = SQLiteStore(tmp_path / "log.db")
    request_id = new_request_id()
    store.write([exchange(request_id=request_id, source="server", adapter="s@v1"),
                 exchange(request_id=request_id, source="router", arm="student")], [])
    assert store.arm_of(request_id).arm == "student"


def test_redaction_runs_before_writing(tmp_path):
    def redact(row: Exchange) -> Exchange:
        return dataclasses.replace(row, prompt=row.prompt.replace("alice@example.com", "[email]"))

    with RequestLog.open(tmp_path / "log.db", redact=redact) as request_log:
        request_log.record(exchange(prompt="mail alice@example.com"))
    [logged] = SQLiteStore(tmp_path / "log.db").query()
    assert logged.exchange.prompt == "mail [email]"


def test_concurrent_writers_and_close_flushes_everything(tmp_path):
    path = tmp_path / "log.db"
    # Two writers (as a server and a router would be) share one file; eight threads each.
    logs = [RequestLog.open(path), RequestLog.open(path)]
    accepted = []
    lock = threading.Lock()

    def produce(request_log: RequestLog, n: int):
        for _ in range(n):
            row = exchange()
            if request_log.record(row):
                with lock:
                    accepted.append(row.request_id)

    threads = [threading.Thread(target=produce, args=(logs[i % 2], 250)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for request_log in logs:
        request_log.close()
    assert sum(log.dropped for log in logs) == 0
    stored = [r.exchange.request_id for r in SQLiteStore(path).query()]
    assert sorted(stored) == sorted(accepted) and len(stored) == 2000


def test_full_queue_drops_and_counts_without_blocking(tmp_path):
    class SlowStore(SQLiteStore):
        def write(self, exchanges, feedback):
            time.sleep(0.2)
            super().write(exchanges, feedback)

    drops = []
    request_log = RequestLog(SlowStore(tmp_path / "log.db"), max_queue=5, batch_size=1, on_drop=lambda: drops.append(1))
    started = time.perf_counter()
    results = [request_log.record(exchange()) for _ in range(50)]
    assert time.perf_counter() - started < 0.5
    assert results.count(False) == request_log.dropped == len(drops) > 0
    request_log.close()
    assert len(SQLiteStore(tmp_path / "log.db").query()) == results.count(True)


def test_server_logs_every_exchange_and_returns_its_id(tmp_path, tiny_base_dir):
    import httpx
    import openai

    from tests.serving.server_harness import running_server

    with running_server(tiny_base_dir, tmp_path / "registry", request_log=tmp_path / "server.db") as (url, service):
        ok = httpx.post(f"{url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, timeout=60)
        refused = httpx.post(f"{url}/generate", json={"inputs": "Hello", "parameters": {"adapter_id": "ghost"}}, timeout=60)
        chosen = httpx.post(f"{url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, headers={"x-request-id": "ab12"})
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        list(client.completions.create(model="", prompt="Hello", max_tokens=2, stream=True))
        ids = [r.headers["x-request-id"] for r in (ok, refused, chosen)]
    assert chosen.headers["x-request-id"] == "ab12"
    rows = {r.exchange.request_id: r.exchange for r in SQLiteStore(tmp_path / "server.db").query()}
    assert set(ids) <= set(rows) and len(rows) == 4
    assert rows[ids[0]].generated_tokens == 3 and rows[ids[0]].output and rows[ids[0]].adapter == "__base__"
    assert rows[ids[1]].status == 424 and rows[ids[1]].outcome == "not_found"
    [streamed] = [r for r in rows.values() if r.protocol == "openai_completions"]
    assert streamed.generated_tokens == 2 and streamed.ttft_ms is not None
