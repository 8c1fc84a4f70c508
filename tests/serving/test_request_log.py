"""The request log on both stores, a real SQLite file and a real PostgreSQL: schema, queries, concurrency, shutdown flush.

Each behaviour test runs once per store (``target`` is a SQLite path or a ``postgresql://`` URL),
so the stores answer the same calls the same way.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

import stillhouse
from serving.loopback import free_port
from serving.request_log import (
    Exchange, Feedback, PostgresStore, RequestLog, RequestLogError, SQLiteStore, Store, hash_unit, new_request_id, open_store, parse_target,
)
from tests.serving.postgres_harness import postgres_server, postgres_url  # noqa: F401  (fixtures)


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path):
    """Where a test's request log lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "log.db"
    return request.getfixturevalue("postgres_url")


def exchange(**overrides) -> Exchange:
    values = dict(request_id=new_request_id(), prompt="Review: ok\nSentiment:", protocol="lorax", output=" positive")
    return Exchange(**{**values, **overrides})


def test_round_trip_keeps_every_field(target):
    row = exchange(
        route="sentiment", arm="student", adapter="s@v1", template_version="t1", config_version="c1",
        parameters={"max_new_tokens": 4, "stop": ["\n"]}, prompt_tokens=7, generated_tokens=2,
        latency_ms=12.5, ttft_ms=3.0, status=200, outcome="success", unit_hash=hash_unit("user-1"), source="router",
        fallback_from="teacher",
    )
    with RequestLog.open(target) as request_log:
        assert request_log.record(row)
    [logged] = open_store(target).query()
    assert logged.exchange == row
    assert logged.feedback == {}


def test_unit_ids_are_hashed_and_salted():
    assert hash_unit("alice") == hash_unit("alice")
    assert hash_unit("alice") != hash_unit("alice", salt="s")
    assert "alice" not in hash_unit("alice")


def test_wal_mode(tmp_path):
    SQLiteStore(tmp_path / "log.db").close()
    assert sqlite3.connect(tmp_path / "log.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_both_stores_hold_the_same_tables_columns_and_indexes(tmp_path, postgres_url):
    SQLiteStore(tmp_path / "log.db").close()
    PostgresStore(postgres_url).close()
    lite = sqlite3.connect(tmp_path / "log.db")
    sqlite_schema = {
        table: ([row[1] for row in lite.execute(f"PRAGMA table_info({table})")], sorted(row[1] for row in lite.execute(f"PRAGMA index_list({table})")))
        for table in ("exchanges", "feedback")
    }
    with psycopg.connect(postgres_url) as db:
        postgres_schema = {
            table: (
                [r[0] for r in db.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position", (table,))],
                sorted(r[0] for r in db.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s AND indexname NOT LIKE %s", (table, "%_pkey"))),
            )
            for table in ("exchanges", "feedback")
        }
    assert postgres_schema == sqlite_schema
    assert sqlite_schema["exchanges"][1] == ["exchanges_request_id", "exchanges_route_arm_ts"]


def test_query_filters_and_feedback_join(target):
    store = open_store(target)
    now = time.time()
    a = exchange(route="r", arm="a", adapter="x@v1", ts=now - 100)
    b = exchange(route="r", arm="b", adapter="y@v1", ts=now)
    c = exchange(route="other", arm="a", ts=now, source="router")
    shadow = exchange(route="r", arm="c", shadow_of=b.request_id, shadow_agreement=True, ts=now)
    store.write([a, b, c, shadow], [Feedback(a.request_id, "correct", 1), Feedback(b.request_id, "correct", 0),
                                    Feedback(b.request_id, "rating", 4), Feedback(b.request_id, "rating", 2)])
    ids = lambda rows: [r.exchange.request_id for r in rows]  # noqa: E731
    assert ids(store.query(route="r")) == [a.request_id, b.request_id]
    assert ids(store.query(route="r", arm="b")) == [b.request_id]
    assert ids(store.query(adapter="x@v1")) == [a.request_id]
    assert ids(store.query(source="router")) == [c.request_id]
    assert ids(store.query(since=now - 50)) == [b.request_id, c.request_id]
    assert ids(store.query(until=now - 50)) == [a.request_id]
    assert ids(store.query(limit=2)) == [a.request_id, b.request_id]
    assert ids(store.query(min_feedback={"correct": 1})) == [a.request_id]
    assert ids(store.query(min_feedback={"rating": 3})) == [b.request_id]
    assert ids(store.query(min_feedback={"rating": 3, "correct": 1})) == []
    assert store.query(arm="b")[0].feedback == {"correct": 0, "rating": 3}
    [mirrored] = [r for r in store.query(include_shadow=True) if r.exchange.shadow_of]
    assert mirrored.exchange.shadow_agreement is True
    assert store.arm_of(b.request_id).arm == "b"
    assert store.arm_of(shadow.request_id) is None  # a shadow call is never the served arm
    assert store.arm_of("missing") is None
    store.close()


def test_feedback_join_spans_many_request_ids(target):
    store = open_store(target)
    rows = [exchange(route="r") for _ in range(1200)]  # more ids than one IN (...) list holds
    store.write(rows, [Feedback(r.request_id, "rating", float(i % 5)) for i, r in enumerate(rows)])
    logged = store.query(route="r")
    assert [r.exchange.request_id for r in logged] == [r.request_id for r in rows]
    assert [r.feedback for r in logged] == [{"rating": float(i % 5)} for i in range(1200)]
    store.close()


def test_arm_of_prefers_the_router_row(target):
    store = open_store(target)
    request_id = new_request_id()
    store.write([exchange(request_id=request_id, source="server", adapter="s@v1"),
                 exchange(request_id=request_id, source="router", arm="student")], [])
    assert store.arm_of(request_id).arm == "student"
    store.close()


def test_redaction_runs_before_writing(target):
    def redact(row: Exchange) -> Exchange:
        return dataclasses.replace(row, prompt=row.prompt.replace("alice@example.com", "[email]"))

    with RequestLog.open(target, redact=redact) as request_log:
        request_log.record(exchange(prompt="mail alice@example.com"))
    [logged] = open_store(target).query()
    assert logged.exchange.prompt == "mail [email]"


def test_text_postgres_cannot_hold_does_not_lose_the_batch(target):
    odd = exchange(prompt="a\x00b", parameters={"stop": ["\x00"], "temperature": float("nan")})
    plain = exchange()
    with RequestLog.open(target) as request_log:
        request_log.record(odd)
        request_log.record(plain)
    assert request_log.dropped == 0
    stored = {r.exchange.request_id: r.exchange for r in open_store(target).query()}
    assert set(stored) == {odd.request_id, plain.request_id}
    if isinstance(target, str):  # PostgreSQL text has no NUL, JSONB no NaN
        assert stored[odd.request_id].prompt == "a\ufffdb"
        assert stored[odd.request_id].parameters == {"stop": ["\ufffd"], "temperature": "nan"}
    else:
        assert stored[odd.request_id].prompt == "a\x00b"


def test_poisoned_rows_cost_no_clean_row(target):
    clean = [exchange() for _ in range(384)]
    surrogate = exchange(prompt="a\ud800b", output="\udfff", parameters={"stop": ["\ud800"], "\udc00": 1})
    unstorable = exchange(prompt_tokens=2**70)  # no store's integer column holds it
    late_feedback = Feedback(request_id=clean[0].request_id, metric="correct\ud800", value=1.0)
    rows = [*clean[:11], surrogate, *clean[11:200], unstorable, *clean[200:], late_feedback]
    drops, sanitised = [], []
    with RequestLog.open(target, on_drop=drops.append, on_sanitise=sanitised.append) as request_log:
        for row in rows:
            assert request_log.record(row) if isinstance(row, Exchange) else request_log.feedback(row)
    stored = {r.exchange.request_id: r for r in open_store(target).query()}
    assert {row.request_id for row in clean} <= set(stored) and len(stored) == len(clean) + 1
    assert unstorable.request_id not in stored
    kept = stored[surrogate.request_id].exchange
    assert (kept.prompt, kept.output, kept.parameters) == ("a\ufffdb", "\ufffd", {"stop": ["\ufffd"], "\ufffd": 1})
    assert stored[clean[0].request_id].feedback == {"correct\ufffd": 1.0}
    assert request_log.dropped == sum(drops) == 1 and request_log.failed_batches == 0
    assert request_log.sanitised == sum(sanitised) == 2


def test_concurrent_writers_and_close_flushes_everything(target):
    # Two writers (as a server and a router would be) share one store; eight threads each.
    logs = [RequestLog.open(target), RequestLog.open(target)]
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
    stored = [r.exchange.request_id for r in open_store(target).query()]
    assert sorted(stored) == sorted(accepted) and len(stored) == 2000


class SlowStore(Store):
    """A real store whose writes take 0.2 s, as a loaded database's would."""

    def __init__(self, inner: Store):
        self.inner = inner

    def write(self, exchanges, feedback):
        time.sleep(0.2)
        self.inner.write(exchanges, feedback)

    def query(self, **filters):
        return self.inner.query(**filters)

    def arm_of(self, request_id):
        return self.inner.arm_of(request_id)

    def close(self):
        self.inner.close()


def test_full_queue_drops_and_counts_without_blocking(target):
    drops = []
    request_log = RequestLog(SlowStore(open_store(target)), max_queue=5, batch_size=1, on_drop=drops.append)
    started = time.perf_counter()
    results = [request_log.record(exchange()) for _ in range(50)]
    assert time.perf_counter() - started < 0.5
    assert results.count(False) == request_log.dropped == sum(drops) > 0
    request_log.close()
    assert len(open_store(target).query()) == results.count(True)


def test_replicas_starting_at_once_create_the_schema_once(postgres_url):
    barrier = threading.Barrier(8)

    def start(_) -> PostgresStore:
        barrier.wait()  # all eight connect and create the schema at the same moment
        return PostgresStore(postgres_url)

    with ThreadPoolExecutor(8) as pool:
        opened = list(pool.map(start, range(8)))  # re-raises any thread's error
    opened[0].write([exchange()], [])
    assert all(len(store.query()) == 1 for store in opened)
    for store in opened:
        store.close()


def test_a_database_outage_drops_and_counts_rows_and_never_blocks(postgres_server, postgres_url):
    request_log = RequestLog.open(postgres_url)
    before = [exchange() for _ in range(20)]
    for row in before:
        assert request_log.record(row)
    request_log.flush()

    with postgres_server.stopped():
        started = time.perf_counter()
        during = [exchange() for _ in range(200)]
        assert all(request_log.record(row) for row in during)  # queued at once: the writer meets the outage, not the caller
        request_log.flush()
        assert time.perf_counter() - started < 10
        assert request_log.dropped == len(during) and request_log.failed_batches >= 1

    deadline = time.monotonic() + 30
    probes = []
    while not request_log.store.query(source="probe"):  # the writer reconnects on its own
        assert time.monotonic() < deadline, "the request log never wrote again after the database came back"
        probes.append(exchange(source="probe"))
        request_log.record(probes[-1])
        request_log.flush()
        time.sleep(0.2)
    after = [exchange() for _ in range(50)]
    for row in after:
        request_log.record(row)
    request_log.close()

    stored = [r.exchange.request_id for r in open_store(postgres_url).query(source="server")]
    assert sorted(stored) == sorted(r.request_id for r in before + after)
    assert request_log.dropped == len(during) + len(probes) - len(open_store(postgres_url).query(source="probe"))


def test_targets_name_their_store_and_bad_ones_say_what_to_fix(tmp_path):
    assert parse_target(str(tmp_path / "log.db")) == tmp_path / "log.db"
    assert parse_target("postgres://u@db.internal/requests") == "postgres://u@db.internal/requests"
    for bad, says in (
        ("postgresql://u:pw@h:port/db", "port 'port' is not a number"),
        ("postgresql://u@h/db?colour=blue", 'invalid URI query parameter: "colour"'),
        ("mysql://u@h/db", "mysql:// is not a request-log store"),
        ("postgresql://u:pw@[::1/db", 'matching "]" in IPv6 host address'),
        ("postgresql://u@h:x/db?password=pw", "port 'x' is not a number"),
    ):
        with pytest.raises(RequestLogError, match="postgresql://USER") as raised:
            parse_target(bad)
        assert says in str(raised.value) and "pw" not in str(raised.value)
    with pytest.raises(RequestLogError, match=r"cannot reach .*u:\*\*\*@127\.0\.0\.1.* start it, or fix") as raised:
        open_store(f"postgresql://u:s3cret@127.0.0.1:{free_port()}/db")
    assert "s3cret" not in str(raised.value)
    (tmp_path / "a-file").touch()
    with pytest.raises(RequestLogError, match="pass a writable path"):
        open_store(tmp_path / "a-file" / "log.db")  # its folder is a file


@pytest.mark.parametrize("command", ["serve", "route"])
def test_the_flag_refuses_a_bad_or_unreachable_database_at_start_up(command, tmp_path, capsys):
    config = tmp_path / "traffic.yaml"
    config.write_text("version: 1\nsalt: s\ndefault_upstream: http://127.0.0.1:9\nroutes: {}\n")
    flags = ["serve", "--base", "tiny", "--registry", str(tmp_path / "registry")] if command == "serve" else ["route", "--config", str(config)]
    with pytest.raises(SystemExit) as usage:
        stillhouse.main([*flags, "--request-log", "postgresql://u@h:nope/db"])
    assert usage.value.code == 2
    assert "argument --request-log: 'postgresql://u@h:nope/db': port 'nope' is not a number" in capsys.readouterr().err
    assert stillhouse.main([*flags, "--request-log", f"postgresql://u@127.0.0.1:{free_port()}/db"]) == 1
    assert "--request-log: cannot reach the PostgreSQL database" in capsys.readouterr().err


def test_server_logs_every_exchange_and_returns_its_id(target, tmp_path, tiny_base_dir):
    import httpx
    import openai

    from tests.serving.server_harness import running_server

    with running_server(tiny_base_dir, tmp_path / "registry", request_log=target) as (url, service):
        ok = httpx.post(f"{url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, timeout=60)
        refused = httpx.post(f"{url}/generate", json={"inputs": "Hello", "parameters": {"adapter_id": "ghost"}}, timeout=60)
        chosen = httpx.post(f"{url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, headers={"x-request-id": "ab12"})
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        list(client.completions.create(model="", prompt="Hello", max_tokens=2, stream=True))
        ids = [r.headers["x-request-id"] for r in (ok, refused, chosen)]
    assert chosen.headers["x-request-id"] == "ab12"
    rows = {r.exchange.request_id: r.exchange for r in open_store(target).query()}
    assert set(ids) <= set(rows) and len(rows) == 4
    assert rows[ids[0]].generated_tokens == 3 and rows[ids[0]].output and rows[ids[0]].adapter == "__base__"
    assert rows[ids[1]].status == 424 and rows[ids[1]].outcome == "not_found"
    [streamed] = [r for r in rows.values() if r.protocol == "openai_completions"]
    assert streamed.generated_tokens == 2 and streamed.ttft_ms is not None
