"""PostgreSQL-only behaviour: DSNs, errors, schema names, migrations, one Backend per
place (its connections, its fused claim's details, its result waits), LISTEN, outages,
fork."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from omniq import registry
from omniq.errors import BackendError, BackendUnavailable, ConfigError
from omniq.models import (
    EventType,
    Task,
    TaskEvent,
    TaskResult,
    TaskStatus,
    new_task_id,
)
from tests.servers import PostgresServer, free_port, private_postgres, require

from . import tech_postgres

psycopg = pytest.importorskip("psycopg")
T = TypeVar("T")
DSN = tech_postgres.DSN


def _need(reason: str | None, what: str) -> None:
    require(reason, what)  # skip locally, fail in CI


@pytest.fixture
def schema() -> Iterator[str]:
    """A fresh schema name on the shared server, dropped afterwards."""
    _need(tech_postgres.unavailable(), "PostgreSQL")
    name = "omniq_sp_" + uuid.uuid4().hex[:10]
    yield name
    _drop_schema(DSN, name)


def _drop_schema(dsn: str, name: str) -> None:
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def make(role: str, dsn: str, schema: str, **options: Any) -> Any:
    settings: dict[str, Any] = {"dsn": dsn, "schema": schema}
    if options:
        settings["options"] = options
    return registry.create("postgres", role, settings)


def run(body: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
    async def main() -> T:
        return await asyncio.wait_for(body(), timeout)

    return asyncio.run(main())


def ok(task_id: str | None = None, value: Any = 1) -> TaskResult:
    return TaskResult(task_id=task_id or new_task_id(), status=TaskStatus.COMPLETED, value=value)


# --- construction and DSNs ---------------------------------------------------


def test_seed_placeholder_dsn_builds_without_connecting() -> None:
    from omniq.events import PostgreSQLEventStorage
    from omniq.results import PostgreSQLResultStorage

    dsn = "postgresql://user:password@host:port/database"
    results = PostgreSQLResultStorage(dsn=dsn)
    events = PostgreSQLEventStorage(dsn=dsn)
    assert "password" not in repr(results) and "host:port/database" in repr(events)

    async def body() -> None:
        with pytest.raises(BackendUnavailable) as err:
            await results.get(new_task_id())
        assert "host:port/database" in str(err.value)
        assert "password" not in str(err.value)
        await results.close()

    run(body)


@pytest.mark.parametrize(
    "settings",
    [
        {"dsn": "postgresql://postgres@127.0.0.1:5432/test"},
        {"url": "postgres://postgres@127.0.0.1:5432/test?application_name=omniq-test"},
        {"dsn": "host=127.0.0.1 port=5432 dbname=test user=postgres"},
        {"host": "127.0.0.1", "port": 5432, "db": "test", "username": "postgres"},
        {"dsn": "postgresql://nobody@127.0.0.1:1/nowhere", "port": 5432, "db": "test",
         "username": "postgres", "options": {"connect_timeout": 3, "max_size": 2}},
    ],
    ids=["url", "url-alias", "key-value", "parts", "parts-override-dsn"],
)
def test_dsn_forms_reach_the_server(settings: dict[str, Any], schema: str) -> None:
    store = registry.create("postgres", "results", {**settings, "schema": schema})

    async def body() -> None:
        r = ok()
        await store.store(r)
        assert await store.get(r.task_id) == r
        await store.close()

    run(body)


def test_tls_and_libpq_options_are_passed_through() -> None:
    store = registry.create("postgres", "queue", {
        "dsn": "postgresql://u:secret@db.example:6543/app",
        "tls": {"ca": "/etc/ca.pem", "cert": "/etc/c.pem", "key": "/etc/k.pem"},
        "options": {"application_name": "billing", "max_size": 3},
    })
    conninfo = store.backend.place.conninfo
    for part in ("sslmode=verify-full", "sslrootcert=/etc/ca.pem", "sslcert=/etc/c.pem",
                 "sslkey=/etc/k.pem", "application_name=billing", "port=6543"):
        assert part in conninfo
    assert "secret" not in repr(store)
    assert "sslmode=require" in registry.create(
        "postgres", "events", {"dsn": "postgresql://h/db", "tls": True}
    ).backend.place.conninfo


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="tls"):
        registry.create("postgres", "queue", {"dsn": "postgresql://h/db", "tls": {"bogus": 1}})
    with pytest.raises(ConfigError, match="min_size"):
        registry.create("postgres", "queue", {"dsn": "postgresql://h/db",
                                              "options": {"min_size": 5, "max_size": 2}})
    with pytest.raises(ConfigError, match="DSN"):
        registry.create("postgres", "queue", {})
    with pytest.raises(ConfigError, match="bogus"):
        registry.create("postgres", "queue", {"dsn": "postgresql://h/db",
                                              "options": {"bogus": 1}})
    with pytest.raises(ConfigError, match="command_timeout"):
        registry.create("postgres", "queue", {"dsn": "postgresql://h/db",
                                              "options": {"command_timeout": 0}})
    store = registry.create("postgres", "queue", {"dsn": "postgresql://h/db?bogus=1"})

    async def body() -> None:
        with pytest.raises(ConfigError, match="DSN"):
            await store.open()

    run(body)


def test_unknown_settings_are_refused_once() -> None:
    with pytest.raises(ConfigError, match=r"'prefix'.*it takes:.*schema"):
        registry.create("postgres", "queue", {"dsn": "postgresql://h/db", "prefix": "x"})


# --- errors never show the password -------------------------------------------


@pytest.mark.parametrize("form", ["url", "key-value"])
def test_unreachable_port_is_unavailable_without_password(form: str) -> None:
    port = free_port()
    dsn = (f"postgresql://postgres:S3cretPw@127.0.0.1:{port}/test" if form == "url"
           else f"host=127.0.0.1 port={port} dbname=test user=postgres password=S3cretPw")
    store = registry.create("postgres", "queue", {"dsn": dsn})

    async def body() -> str:
        with pytest.raises(BackendUnavailable) as err:
            await store.open()
        return str(err.value)

    message = run(body)
    assert f"127.0.0.1:{port}/test" in message
    assert "S3cretPw" not in message and "\n" not in message


def test_missing_database_is_unavailable_without_password() -> None:
    _need(tech_postgres.unavailable(), "PostgreSQL")
    db = "omniq_no_such_db_" + uuid.uuid4().hex[:6]
    store = registry.create(
        "postgres", "events", {"dsn": f"postgresql://postgres:S3cretPw@127.0.0.1:5432/{db}"}
    )

    async def body() -> str:
        with pytest.raises(BackendUnavailable) as err:
            await store.append(TaskEvent(task_id=new_task_id(), event_type=EventType.ENQUEUED))
        return str(err.value)

    message = run(body)
    assert db in message and "does not exist" in message
    assert "S3cretPw" not in message


def test_sql_errors_become_backend_errors(schema: str) -> None:
    store = make("queue", DSN, schema)

    async def body() -> None:
        await store.open()
        _drop_schema(DSN, schema)  # pulled from under the open store
        with pytest.raises(BackendError, match="does not exist"):
            await store.enqueue(Task(func="m:f"))
        await store.close()

    run(body)


# --- schema names and migrations --------------------------------------------------


def test_odd_schema_name_is_quoted_everywhere() -> None:
    _need(tech_postgres.unavailable(), "PostgreSQL")
    name = f'My "odd" schema {uuid.uuid4().hex[:6]}'
    try:
        async def body() -> None:
            q, r, e = (make(role, DSN, name) for role in ("queue", "results", "events"))
            task = Task(func="m:f", queue="odd")
            await q.enqueue(task)
            d = await q.dequeue(["odd"], 30, 1)
            assert d is not None and d.task == task
            waiter = asyncio.create_task(r.wait(task.id, 10))
            await asyncio.sleep(0.1)
            await r.store(ok(task.id))
            assert await waiter is not None
            await e.append(TaskEvent(task_id=task.id, event_type=EventType.STARTED))
            assert len(await e.get(task.id)) == 1
            for store in (q, r, e):
                await store.close()

        run(body)
    finally:
        _drop_schema(DSN, name)


@pytest.mark.parametrize("name", ["", "   ", "x" * 64, "pg_mine", "a\x00b"])
def test_unusable_schema_names_are_refused_clearly(name: str) -> None:
    with pytest.raises(ConfigError, match="schema name"):
        registry.create("postgres", "queue", {"dsn": DSN, "schema": name})


def _versions(schema: str) -> list[int]:
    from psycopg import sql

    with psycopg.connect(DSN, autocommit=True) as conn:
        query = sql.SQL("SELECT version FROM {}.schema_version ORDER BY version")
        return [row[0] for row in conn.execute(query.format(sql.Identifier(schema)))]


def test_migrations_are_idempotent(schema: str) -> None:
    from omniq.backends.postgres import SCHEMA_VERSION

    async def body() -> None:
        for role in ("queue", "results", "events", "queue"):
            store = make(role, DSN, schema)
            await store.open()
            await store.open()
            await store.close()

    run(body)
    assert _versions(schema) == list(range(1, SCHEMA_VERSION + 1))


def test_concurrent_first_opens_of_a_fresh_schema(schema: str) -> None:
    async def body() -> None:
        stores = [make(role, DSN, schema) for role in ("queue", "results", "events") * 2]
        await asyncio.gather(*(s.open() for s in stores))
        await stores[0].enqueue(Task(func="m:f"))
        for s in stores:
            await s.close()

    run(body)
    assert len(_versions(schema)) >= 1


def _schema_v1(schema: str) -> None:
    """A schema as OmniQ left it before migration 2, holding what it wrote then: events
    without ids, an unfinished task with a unique key, a result."""
    from psycopg import sql

    from omniq.backends.postgres import _MIGRATIONS, _compose
    from omniq.serialization import dumps, encode_result, encode_task, event_to_dict

    def q(text: str) -> Any:
        return sql.SQL(text).format(sql.Identifier(schema))

    with psycopg.connect(DSN, autocommit=True) as conn, conn.transaction():
        conn.execute(q("CREATE SCHEMA {}"))
        conn.execute(q("CREATE TABLE {}.schema_version (version integer PRIMARY KEY,"
                       " applied_at timestamptz NOT NULL DEFAULT now())"))
        for statement in _MIGRATIONS[0]:
            conn.execute(_compose(statement, schema))
        conn.execute(q("INSERT INTO {}.schema_version (version) VALUES (1)"))
        for kind in (EventType.ENQUEUED, EventType.STARTED):
            old = event_to_dict(TaskEvent(task_id=OLD_TASK.id, event_type=kind))
            del old["id"], old["v"]  # the old format had neither
            conn.execute(q("INSERT INTO {}.events (task_id, ts, payload) VALUES (%s, now(), %s)"),
                         (OLD_TASK.id, dumps(old).encode()))
        conn.execute(q("INSERT INTO {}.tasks (id, queue, unique_key, payload)"
                       " VALUES (%s, %s, %s, %s)"),
                     (OLD_TASK.id, OLD_TASK.queue, OLD_TASK.unique_key, encode_task(OLD_TASK)))
        conn.execute(q("INSERT INTO {}.results (task_id, finished_at, payload)"
                       " VALUES (%s, now(), %s)"), (OLD_RESULT.task_id, encode_result(OLD_RESULT)))


OLD_TASK = Task(func="m:f", queue="old", unique_key="nightly")
OLD_RESULT = TaskResult(task_id=new_task_id(), status=TaskStatus.COMPLETED, value="kept")


def test_a_store_of_schema_1_is_migrated_and_keeps_working(schema: str) -> None:
    from omniq.backends.postgres import SCHEMA_VERSION

    _schema_v1(schema)

    async def body() -> None:
        q, r, e = (make(role, DSN, schema) for role in ("queue", "results", "events"))
        old = await e.get(OLD_TASK.id)
        assert [ev.event_type for ev in old] == [EventType.ENQUEUED, EventType.STARTED]
        assert [ev.id for ev in await e.get(OLD_TASK.id)] == [ev.id for ev in old]  # stable
        new = TaskEvent(task_id=OLD_TASK.id, event_type=EventType.COMPLETED)
        await e.append(new)
        await e.append_many([new])
        assert [ev.id for ev in await e.get(OLD_TASK.id)] == [*(ev.id for ev in old), new.id]
        # The key of the task queued before the upgrade is still held by it.
        assert await q.enqueue(Task(func="m:f", queue="old", unique_key="nightly")) == OLD_TASK.id
        d = await q.dequeue(["old"], 30, 0)
        assert d is not None and d.task == OLD_TASK and d.attempt == 1
        assert await q.ack(d) is True
        fresh = Task(func="m:f", queue="old", unique_key="nightly")
        assert await q.enqueue(fresh) == fresh.id
        assert await r.get(OLD_RESULT.task_id) == OLD_RESULT
        assert await r.store(ok(OLD_RESULT.task_id, value="late")) is False
        for s in (q, r, e):
            await s.close()

    run(body)
    assert _versions(schema) == list(range(1, SCHEMA_VERSION + 1))


def _unique_rows(schema: str) -> list[tuple[Any, ...]]:
    from psycopg import sql

    with psycopg.connect(DSN, autocommit=True) as conn:
        query = sql.SQL("SELECT unique_key, task_id, held_until IS NOT NULL"
                        " FROM {}.unique_keys ORDER BY unique_key")
        return conn.execute(query.format(sql.Identifier(schema))).fetchall()


def test_unique_keys_are_not_kept_longer_than_they_are_held(schema: str) -> None:
    async def body() -> None:
        q = make("queue", DSN, schema)
        short = Task(func="m:f", queue="k", unique_key="short")
        held = Task(func="m:f", queue="k", unique_key="held", unique_ttl=0.5)
        gone = [Task(func="m:f", queue="k2", unique_key=f"gone{i}") for i in range(2)]
        for t in (short, held, *gone):
            await q.enqueue(t)
        assert await q.cancel(gone[0].id) is True
        assert await q.purge("k2") == 1
        for _ in range(2):
            d = await q.dequeue(["k"], 30, 0)
            assert d is not None and await q.ack(d) is True
        assert _unique_rows(schema) == [("held", held.id, True)]
        await asyncio.sleep(0.7)
        # A worker's heartbeat sweeps the keys whose hold time has passed.
        from omniq.models import WorkerInfo, utcnow

        now = utcnow()
        await q.register_worker(WorkerInfo("w", "h", 1, ("k",), now, now), 10)
        assert _unique_rows(schema) == []
        await q.close()

    run(body)


def test_racing_producers_of_one_key_store_one_task(schema: str) -> None:
    async def body() -> None:
        producers = [make("queue", DSN, schema) for _ in range(8)]
        await asyncio.gather(*(p.open() for p in producers))
        for round_ in range(20):
            key = f"race-{round_}"
            tasks = [Task(func="m:f", queue="race", unique_key=key) for _ in producers]
            pairs = zip(producers, tasks, strict=True)
            ids = await asyncio.gather(*(p.enqueue(t) for p, t in pairs))
            assert len(set(ids)) == 1 and ids[0] in {t.id for t in tasks}, ids
        stats = {s.queue: s for s in await producers[0].stats()}
        assert stats["race"].queued == 20
        for p in producers:
            await p.close()

    run(body)


def test_a_key_whose_task_was_removed_behind_our_back_is_free(schema: str) -> None:
    """A task row deleted by an older OmniQ (which knew no unique_keys table) or by hand
    must not hold its key for ever."""
    from psycopg import sql

    async def body() -> None:
        q = make("queue", DSN, schema)
        first = Task(func="m:f", unique_key="k")
        await q.enqueue(first)
        with psycopg.connect(DSN, autocommit=True) as conn:
            query = sql.SQL("DELETE FROM {}.tasks WHERE id = %s")
            conn.execute(query.format(sql.Identifier(schema)), (first.id,))
        second = Task(func="m:f", unique_key="k")
        assert await q.enqueue(second) == second.id
        assert await q.enqueue(Task(func="m:f", unique_key="k")) == second.id
        await q.close()

    run(body)


def test_a_dead_letter_queued_again_goes_behind_the_waiting_tasks(schema: str) -> None:
    async def body() -> None:
        q = make("queue", DSN, schema)
        dead, other = Task(func="m:f", queue="dl"), Task(func="m:f", queue="dl")
        await q.enqueue(dead)
        d = await q.dequeue(["dl"], 30, 0)
        assert d is not None and await q.ack(d, failed=True) is True
        await q.enqueue(other)
        await q.enqueue(dead)
        order = [await q.dequeue(["dl"], 30, 0) for _ in range(2)]
        assert [(x.task.id, x.attempt) for x in order if x] == [(other.id, 1), (dead.id, 1)]
        await q.close()

    run(body)


# --- one Backend per place ---------------------------------------------------------


def _sessions(application_name: str) -> int:
    with psycopg.connect(DSN, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           (application_name,)).fetchone()
        return int(row[0]) if row else 0


def _sessions_left(application_name: str) -> int:
    """Sessions still there after their client closed them (a server process leaves
    pg_stat_activity a moment after the client hung up)."""
    deadline = time.monotonic() + 5
    while (left := _sessions(application_name)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_stores_of_one_place_share_one_backend(schema: str) -> None:
    from omniq.storage import fused_ops

    q, r, e = (make(role, DSN, schema) for role in ("queue", "results", "events"))
    assert q.backend is r.backend is e.backend
    assert fused_ops(q, r, e) is q.backend
    assert make("queue", DSN, schema + "_other").backend is not q.backend
    assert make("queue", DSN, schema, poll_interval=5).backend is not q.backend


def test_a_worker_and_its_client_use_one_pool_and_one_listener(schema: str) -> None:
    """Issue 10: all three roles of a worker and a client waiting for results, on one
    DSN, hold at most max_size pooled connections plus one LISTEN connection (before,
    every store had its own pool and listener: up to 3 x 4 + 3)."""
    from omniq.worker import Worker, WorkerSettings

    app = "omniq-count-" + uuid.uuid4().hex[:8]
    peak: list[int] = []

    async def body() -> None:
        q, r, e = (make(role, DSN, schema, application_name=app, max_size=4)
                   for role in ("queue", "results", "events"))
        for s in (q, r, e):
            await s.open()
        tasks = [Task(func="omniq.examples:add", args=(i, 1), queue="count") for i in range(40)]
        worker = Worker(q, r, e, WorkerSettings(queues=("count",), concurrency=8, burst=False,
                                                register=True))
        running = asyncio.create_task(worker.run())
        for t in tasks:
            await q.backend.submit(t, TaskEvent(t.id, EventType.ENQUEUED, queue="count"))
        waits = [r.wait(t.id, 30) for t in tasks]
        peak.append(await asyncio.to_thread(_sessions, app))
        assert all(result is not None for result in await asyncio.gather(*waits))
        peak.append(await asyncio.to_thread(_sessions, app))
        worker.request_stop()
        await running
        for s in (q, r, e):
            await s.close()
        peak.append(await asyncio.to_thread(_sessions_left, app))

    run(body)
    assert 2 <= max(peak[:2]) <= 4 + 1, peak  # the pool (max_size 4) and the listener
    assert peak[2] == 0  # the last store closed them all


def test_the_last_store_to_close_closes_the_backend(schema: str) -> None:
    app = "omniq-close-" + uuid.uuid4().hex[:8]

    async def body() -> None:
        first, second = (make("results", DSN, schema, application_name=app) for _ in range(2))
        writer = make("results", DSN, schema)
        await first.open()
        waiting = asyncio.create_task(second.wait(ok().task_id, 0.1))  # the listener starts
        assert await waiting is None
        early = ok()
        waiter = asyncio.create_task(second.wait(early.task_id, 10))
        await asyncio.sleep(0.1)
        await first.close()  # the other store of the Backend goes on, its wait too
        await writer.store(early)
        assert await waiter == early
        assert await asyncio.to_thread(_sessions, app) >= 1
        await second.close()
        assert await asyncio.to_thread(_sessions_left, app) == 0
        await second.open()  # opened again: in use until closed again
        assert await second.get(early.task_id) == early
        await second.close()
        assert await asyncio.to_thread(_sessions_left, app) == 0
        await writer.close()

    run(body)


# --- the fused claim: decided in SQL, or after decoding ---------------------------------


def _set(schema: str, column: str, value: Any, task_id: str) -> None:
    from psycopg import sql

    query = sql.SQL("UPDATE {}.tasks SET {} = %s WHERE id = %s").format(
        sql.Identifier(schema), sql.Identifier(column))
    with psycopg.connect(DSN, autocommit=True) as conn:
        assert conn.execute(query, (value, task_id)).rowcount == 1


def test_a_fused_claim_writes_started_only_for_what_the_worker_runs(schema: str) -> None:
    """SQL decides on STARTED for rows whose digest still seals their payload; a row
    from before it (digest NULL) is decided after decoding, and a payload someone else
    rewrote gets none (the worker fails it undecoded)."""
    from omniq.storage import started_event

    async def body() -> None:
        b = make("queue", DSN, schema).backend
        legacy, rewritten, plain = (Task(func="m:f", queue="seal", args=(i,)) for i in range(3))
        for t in (legacy, rewritten, plain):
            await b.submit(t, TaskEvent(t.id, EventType.ENQUEUED, queue="seal"))
        _set(schema, "digest", None, legacy.id)
        await tech_postgres.corrupt_task(b.queue(), rewritten.id, "seal", b"not json")
        got = {d.task_id: d for d in await b.claim(["seal"], 30, 0, 3, "w1")}
        assert got[rewritten.id].problem is not None
        for t, started in ((legacy, True), (rewritten, False), (plain, True)):
            events = await b.events().get(t.id)
            assert [e.event_type for e in events] == [
                EventType.ENQUEUED, *([EventType.STARTED] if started else [])
            ], t
            if started:
                expected = started_event(got[t.id], "w1")
                assert events[1].id == expected.id and events[1].worker_id == "w1"
        await b.queue().close()

    run(body)


def test_a_task_runs_now_holds_back_gets_no_started_from_a_fused_claim(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rule of storage.runs_now that SQL does not know (issue 11 adds one: tasks that
    wait for others) is kept: such a task is not sealed at enqueue, so the claim
    decides after decoding."""
    from omniq import storage
    from omniq.backends import postgres

    def runs_now(delivery: Any, now: Any = None) -> bool:
        return delivery.task.kwargs.get("hold") is None and storage.runs_now(delivery, now)

    monkeypatch.setattr(postgres, "runs_now", runs_now)

    async def body() -> None:
        b = make("queue", DSN, schema).backend
        held, plain = Task(func="m:f", queue="hold", kwargs={"hold": 1}), Task(func="m:f",
                                                                                queue="hold")
        for t in (held, plain):
            await b.submit(t, TaskEvent(t.id, EventType.ENQUEUED, queue="hold"))
        sent = _count_statements(b)
        assert len(await b.claim(["hold"], 30, 0, 2, "w1")) == 2
        assert dict(sent) == {"claim_started": 1}  # nothing left to decide after decoding
        assert [e.event_type for e in await b.events().get(held.id)] == [EventType.ENQUEUED]
        assert len(await b.events().get(plain.id)) == 2
        await b.queue().close()

    run(body)


def test_a_fused_claim_settles_a_failed_result_as_a_dead_letter(schema: str) -> None:
    async def body() -> None:
        b = make("queue", DSN, schema).backend
        t = Task(func="m:f", queue="settle", max_retries=2, unique_key="settle-key")
        await b.submit(t, TaskEvent(t.id, EventType.ENQUEUED, queue="settle"))
        assert len(await b.claim(["settle"], 0.3, 0, 1, "w1")) == 1
        failed = TaskResult(t.id, TaskStatus.FAILED, error_type="E", attempts=1)
        assert await b.results().store(failed) is True  # and its worker died
        assert await b.claim(["settle"], 30, 1, 1, "w2") == []
        stats = {s.queue: s for s in await b.queue().stats()}
        assert (stats["settle"].failed, stats["settle"].running) == (1, 0)
        # The key was released with it: a new task of that key is taken.
        again = Task(func="m:f", queue="settle", unique_key="settle-key")
        assert await b.submit(again, TaskEvent(again.id, EventType.ENQUEUED)) == again.id
        await b.queue().close()

    run(body)


def test_a_claim_after_a_drained_queue_waits_without_a_statement(schema: str) -> None:
    """A claim that took fewer tasks than it asked for leaves the next waiting claim
    asleep until a notification (an idle worker's loop after a short batch)."""

    async def body() -> None:
        b = make("queue", DSN, schema, poll_interval=120).backend
        producer = make("queue", DSN, schema)
        sent = _count_statements(b)
        first = Task(func="m:f", queue="quiet")
        await producer.enqueue(first)
        assert len(await b.claim(["quiet"], 30, 1, 4, "w1")) == 1
        assert sent["claim_started"] == 1
        assert await b.claim(["quiet"], 30, 0.3, 4, "w1") == []
        assert sent["claim_started"] == 1  # slept: nothing could have come
        later = Task(func="m:f", queue="quiet")
        waiting = asyncio.create_task(b.claim(["quiet"], 30, 10, 4, "w1"))
        await asyncio.sleep(0.2)
        await producer.enqueue(later)
        assert [d.task_id for d in await asyncio.wait_for(waiting, 5)] == [later.id]
        for s in (b.queue(), producer):
            await s.close()

    run(body)


def _count_statements(backend: Any) -> Counter[str]:
    """Count the statements `backend` sends, by name."""
    sent: Counter[str] = Counter()
    execute = backend._execute

    async def counted(name: str, params: Any, fetch: str) -> Any:
        sent[name] += 1
        return await execute(name, params, fetch)

    backend._execute = counted
    return sent


# --- result waits ------------------------------------------------------------------


@pytest.mark.parametrize("size", [10, 20_000], ids=["in-the-notification", "too-big"])
def test_a_result_wait_costs_one_read(size: int, schema: str) -> None:
    """The notification of a stored result carries the result when it fits (NOTIFY
    takes < 8000 bytes), so the waiter's one read is the one before it sleeps."""

    async def body() -> None:
        waiter = make("results", DSN, schema, poll_interval=120)
        writer = make("results", DSN, schema)
        sent = _count_statements(waiter.backend)
        r = ok(value="x" * size)
        waiting = asyncio.create_task(waiter.wait(r.task_id, 30))
        await asyncio.sleep(0.3)
        await writer.store(r)
        assert await asyncio.wait_for(waiting, 10) == r
        assert sent["get_result"] == (1 if size < 7000 else 2)
        for s in (waiter, writer):
            await s.close()

    run(body)


# --- ids PostgreSQL cannot hold ------------------------------------------------------


def test_an_id_with_nul_is_not_found_rather_than_an_error(schema: str) -> None:
    bad = "01a2\x00bad"

    async def body() -> None:
        q, r, e = (make(role, DSN, schema) for role in ("queue", "results", "events"))
        assert await q.get_task(bad) is None
        assert await q.cancel(bad) is False
        assert await r.get(bad) is None
        assert await r.delete(bad) is False
        assert await asyncio.wait_for(r.wait(bad, 30), 5) is None  # at once: it never comes
        assert await e.get(bad) == []
        for s in (q, r, e):
            await s.close()

    run(body)


# --- LISTEN/NOTIFY ------------------------------------------------------------------
# Poll intervals are set far beyond the waits, so only a notification can wake them.


def test_result_wait_is_woken_by_notification(schema: str) -> None:
    async def body() -> None:
        waiter_store = make("results", DSN, schema, poll_interval=120)
        writer = make("results", DSN, schema)
        r = ok(value="pushed")
        waiter = asyncio.create_task(waiter_store.wait(r.task_id, 30))
        await asyncio.sleep(0.3)
        await writer.store(r)
        got = await asyncio.wait_for(waiter, 20)
        assert got is not None and got.value == "pushed"
        for s in (waiter_store, writer):
            await s.close()

    run(body)


def test_dequeue_and_wait_new_are_woken_by_notification(schema: str) -> None:
    async def body() -> None:
        q_wait, q_put = make("queue", DSN, schema, poll_interval=120), make("queue", DSN, schema)
        e_wait, e_put = make("events", DSN, schema, poll_interval=120), make("events", DSN, schema)
        await e_put.open()
        start = await e_wait.last_cursor()
        taker = asyncio.create_task(q_wait.dequeue(["wake"], 30, 30))
        follower = asyncio.create_task(e_wait.wait_new(start, 30))
        await asyncio.sleep(0.3)
        task = Task(func="m:f", queue="wake")
        await q_put.enqueue(task)
        await e_put.append(TaskEvent(task_id=task.id, event_type=EventType.ENQUEUED))
        d = await asyncio.wait_for(taker, 20)
        assert d is not None and d.task.id == task.id
        await asyncio.wait_for(follower, 20)
        assert [e.task_id for _, e in await e_wait.read(start, 10)] == [task.id]
        for s in (q_wait, q_put, e_wait, e_put):
            await s.close()

    run(body)


# --- fork ---------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_reconnects_and_leaves_the_parent_alone(schema: str) -> None:
    store = make("queue", DSN, schema)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(store.open())
        sessions = [c.info.backend_pid for c in _pool(store).idle]
        child_task = Task(func="m:f", queue="forked")
        pid = os.fork()
        if pid == 0:  # child: new loop, must not reuse the parent's sockets
            code = 1
            try:
                child_loop = asyncio.new_event_loop()
                child_loop.run_until_complete(store.enqueue(child_task))
                child_loop.run_until_complete(store.close())
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        got = loop.run_until_complete(store.get_task(child_task.id))
        assert got == child_task
        # The parent kept its own sessions: the child did not close them.
        assert [c.info.backend_pid for c in _pool(store).idle] == sessions
        loop.run_until_complete(store.close())
    finally:
        loop.close()


def _pool(store: Any) -> Any:
    state = store.backend._bound._value
    assert state is not None
    return state.pool


def test_store_moves_to_a_new_event_loop(schema: str) -> None:
    store = make("results", DSN, schema)
    r = ok(value="first loop")

    async def first() -> None:
        await store.store(r)
        assert await store.wait(r.task_id, 1) == r  # starts the listener on this loop

    async def second() -> None:
        assert await store.get(r.task_id) == r
        late = ok()
        waiter = asyncio.create_task(store.wait(late.task_id, 10))
        await asyncio.sleep(0.2)
        await store.store(late)
        assert await waiter == late
        await store.close()

    asyncio.run(first())  # ends without close(), like a CLI command
    asyncio.run(second())


# --- outage and reconnect (private server) ------------------------------------------


@pytest.fixture(scope="module")
def private_server() -> Iterator[PostgresServer]:
    """A throw-away cluster on a free port (tests/servers.py), stopped and started below."""
    with private_postgres() as server:
        yield server


def test_outage_raises_unavailable_then_the_same_stores_recover(
    private_server: PostgresServer,
) -> None:
    dsn = private_server.dsn

    async def body() -> None:
        q = make("queue", dsn, "outage", connect_timeout=2, poll_interval=120)
        r = make("results", dsn, "outage", connect_timeout=2, poll_interval=120)
        e = make("events", dsn, "outage", connect_timeout=2, poll_interval=120)
        other = make("results", dsn, "outage")
        for s in (q, r, e, other):
            await s.open()
        before = Task(func="m:f")
        await q.enqueue(before)
        early = ok()
        await other.store(early)
        assert await r.wait(early.task_id, 5) == early  # the listener is up

        late_task = Task(func="m:f")
        await asyncio.to_thread(private_server.stop)
        outage: list[Callable[[], Awaitable[Any]]] = [
            lambda: q.enqueue(Task(func="m:f")),
            lambda: q.dequeue(["default"], 30, 1),
            lambda: r.get(early.task_id),
            lambda: r.wait(new_task_id(), 2),
            lambda: e.append(TaskEvent(task_id=before.id, event_type=EventType.STARTED)),
            # the fused operations of their Backend
            lambda: q.backend.submit(late_task, TaskEvent(late_task.id, EventType.ENQUEUED)),
            lambda: q.backend.claim(["default"], 30, 1, 4, "w1"),
        ]
        for op in outage:
            with pytest.raises(BackendUnavailable, match="unavailable"):
                await op()
        await asyncio.to_thread(private_server.start)

        assert await q.backend.submit(late_task, TaskEvent(late_task.id, EventType.ENQUEUED))
        d = await q.dequeue(["default"], 30, 5)
        assert d is not None and d.task.id == before.id
        await e.append(TaskEvent(task_id=before.id, event_type=EventType.STARTED))
        assert len(await e.get(before.id)) == 1
        # The dedicated LISTEN connection reconnected: only a notification wakes this.
        late = ok(d.task.id, value="after restart")
        waiter = asyncio.create_task(r.wait(late.task_id, 30))
        await asyncio.sleep(0.5)
        await other.store(late)
        assert await asyncio.wait_for(waiter, 20) == late
        await q.ack(d)
        for s in (q, r, e, other):
            await s.close()

    run(body, timeout=90)


# --- event cursors under concurrent appends ------------------------------------------


def test_cursor_reader_misses_nothing_while_many_handles_append(schema: str) -> None:
    """Ids are assigned before commit and appends commit in any order (they share the
    event lock); a cursor reader waits for those in flight, or a follower that already
    moved past an id would never see that event. Six Backends (as six processes would)
    with a pool each append at once."""

    async def body() -> None:
        writers = [make("events", DSN, schema, application_name=f"omniq-w{i}")
                   for i in range(6)]
        assert len({w.backend for w in writers}) == 6
        reader = make("events", DSN, schema)
        for s in (*writers, reader):
            await s.open()
        sent: set[str] = set()
        seen: list[str] = []

        async def write(store: Any) -> None:
            for _ in range(60):
                tid = new_task_id()
                sent.add(tid)
                await store.append(TaskEvent(task_id=tid, event_type=EventType.ENQUEUED))

        async def follow(stop: asyncio.Event) -> None:
            cursor = None
            while True:
                finished = stop.is_set()
                rows = await reader.read(cursor, 50)
                seen.extend(event.task_id for _, event in rows)
                if rows:
                    cursor = rows[-1][0]
                if finished and not rows:
                    return

        stop = asyncio.Event()
        follower = asyncio.create_task(follow(stop))
        await asyncio.gather(*(write(w) for w in writers))
        stop.set()
        await follower
        assert len(seen) == len(set(seen))
        assert set(seen) == sent
        for s in (*writers, reader):
            await s.close()

    run(body)


# --- issue 11: dead letters by failure time, forget, records, get_many, waiting tasks ---


def _sql(schema: str, text: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """Run `text` ({s} = the schema) on a connection of its own; its rows, if any."""
    from psycopg import sql

    with psycopg.connect(DSN, autocommit=True) as conn:
        cur = conn.execute(sql.SQL(text).format(s=sql.Identifier(schema)), params or None)
        return cur.fetchall() if cur.description else []


async def _dead(q: Any, queue: str, **task: Any) -> Task:
    """A dead letter of `queue`, failed now."""
    t = Task(func="m:f", queue=queue, **task)
    await q.enqueue(t)
    d = await q.dequeue([queue], 30, 0)
    assert d is not None and d.task_id == t.id
    assert await q.ack(d, failed=True) is True
    return t


def test_dead_letters_of_schema_3_and_of_an_older_omniq_beside_are_listed(schema: str) -> None:
    """A failed row's `due` has always been its failure time, so the index added by
    migration 4 lists rows failed before it, and rows an OmniQ of schema 3 still fails
    beside us, at the exact time they failed."""
    from datetime import UTC, datetime

    from omniq.backends.postgres import _MIGRATIONS, SCHEMA_VERSION, _compose_statement
    from omniq.serialization import encode_task

    _sql(schema, "CREATE SCHEMA {s}")
    _sql(schema, "CREATE TABLE {s}.schema_version (version integer PRIMARY KEY,"
         " applied_at timestamptz NOT NULL DEFAULT now())")
    for version in (1, 2, 3):
        for statement in _MIGRATIONS[version - 1]:
            _sql(schema, _compose_statement(statement, schema).replace(f'"{schema}"', "{s}"))
        _sql(schema, "INSERT INTO {s}.schema_version (version) VALUES (%s)", (version,))
    before = Task(func="m:f", queue="v3")
    failed_at = datetime(2020, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    _sql(schema, "INSERT INTO {s}.tasks (id, queue, state, due, attempts, payload)"
         " VALUES (%s, 'v3', 'failed', %s, 1, %s)", (before.id, failed_at, encode_task(before)))

    async def body() -> None:
        q = make("queue", DSN, schema)
        assert [(f.task, f.failed_at) for f in await q.failed(queue="v3")] == [
            (before, failed_at)]
        beside = Task(func="m:f", queue="v3")
        await q.enqueue(beside)
        d = await q.dequeue(["v3"], 30, 0)
        assert d is not None and d.task_id == beside.id
        # What an OmniQ of schema 3 sends to fail a task (its "dead" statement).
        _sql(schema, "UPDATE {s}.tasks SET state = 'failed', token = NULL, due = now()"
             " WHERE id = %s AND token = %s AND state = 'running'", (d.task_id, d.receipt))
        assert [f.task.id for f in await q.failed(queue="v3")] == [beside.id, before.id]
        assert await q.forget([before.id]) == 1
        await q.put_record("schedule", "nightly", b"{}")
        assert await q.list_records("schedule") == [("nightly", b"{}")]
        await q.close()

    run(body)
    assert _versions(schema) == list(range(1, SCHEMA_VERSION + 1))


def _plan_of(schema: str, name: str, params: dict[str, Any]) -> str:
    from omniq.backends.postgres import backend_for

    statement = backend_for({"dsn": DSN, "schema": schema})._sql[name]
    with psycopg.connect(DSN, autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        return "\n".join(row[0] for row in cur.execute("EXPLAIN " + statement, params))


def test_failed_reads_an_index_by_failure_time_never_the_table(schema: str) -> None:
    """Among 20k waiting tasks and 200 dead letters, failed() is two short range scans
    of the failure-time indexes, with or without a queue. (With 100k tasks of which
    1k failed: ~1 ms a page of 100; a scan of the table took 30 ms.)"""
    from omniq.backends.postgres import _DAWN, _DUSK

    async def body() -> None:
        q = make("queue", DSN, schema)
        await q.open()
        await q.close()

    run(body)
    _sql(schema, "INSERT INTO {s}.tasks (id, queue, state, due, payload)"
         " SELECT 't' || i, 'q' || (i % 4), CASE WHEN i % 100 = 0 THEN 'failed'"
         " ELSE 'waiting' END, now() - i * interval '1 second', '{{}}'::bytea"
         " FROM generate_series(1, 20000) AS i")
    _sql(schema, "ANALYZE {s}.tasks")
    for name, queue in (("failed", None), ("failed_queue", "q1")):
        plan = _plan_of(schema, name, {"queue": queue, "since": _DAWN, "before": _DUSK,
                                       "limit": 100})
        assert "Seq Scan" not in plan and "Bitmap" not in plan, plan
        assert plan.count("Index") >= 2 and "tasks_failed" in plan, plan


def test_failed_pages_by_the_stored_microsecond_and_keeps_a_group_whole(schema: str) -> None:
    """The failed_at returned is the stored value (microseconds, UTC); a page never
    ends inside a group of one failure time, so paging by `before` misses none."""
    from datetime import UTC, datetime

    async def body() -> None:
        q = make("queue", DSN, schema)
        dead = [await _dead(q, "mu") for _ in range(5)]
        old = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
        new = datetime(2031, 5, 6, 7, 8, 9, 123457, tzinfo=UTC)
        for t, at in zip(dead, (old, old, new, new, new), strict=True):
            _sql(schema, "UPDATE {s}.tasks SET due = %s WHERE id = %s", (at, t.id))
        first = await q.failed(queue="mu", limit=1)
        assert sorted(f.task.id for f in first) == sorted(t.id for t in dead[2:])
        assert {f.failed_at for f in first} == {new}
        assert all(f.failed_at.utcoffset() == UTC.utcoffset(None) for f in first)
        rest = await q.failed(queue="mu", before=first[-1].failed_at, limit=1)
        assert sorted(f.task.id for f in rest) == sorted(t.id for t in dead[:2])
        assert len(await q.failed(since=old)) == 5
        assert len(await q.failed(since=new)) == 3
        assert await q.failed(queue="mu", before=old) == []
        await q.close()

    run(body)


def test_an_undecodable_dead_letter_is_listed_as_a_placeholder(schema: str) -> None:
    async def body() -> None:
        q = make("queue", DSN, schema)
        bad, good = await _dead(q, "ud"), await _dead(q, "ud")
        await tech_postgres.corrupt_task(q, bad.id, "ud", b"\xffnot json")
        listed = await q.failed(queue="ud")
        assert [(f.task.id, f.task.queue) for f in listed] == [(good.id, "ud"), (bad.id, "ud")]
        assert listed[0].task == good
        await q.close()

    run(body)


def test_forget_frees_a_dead_letters_key_as_a_purge_would(schema: str) -> None:
    async def body() -> None:
        q = make("queue", DSN, schema)
        t = await _dead(q, "fk", unique_key="fk-key", unique_ttl=3600)
        assert await q.enqueue(Task(func="m:f", queue="fk", unique_key="fk-key")) == t.id
        assert await q.forget([t.id, t.id, "no\x00such"]) == 1
        assert _sql(schema, "SELECT * FROM {s}.unique_keys") == []
        again = Task(func="m:f", queue="fk", unique_key="fk-key")
        assert await q.enqueue(again) == again.id
        assert await q.forget([again.id]) == 0  # waiting, not dead: left alone
        await q.close()

    run(body)


def test_operator_calls_are_one_statement_each(schema: str) -> None:
    async def body() -> None:
        b = make("queue", DSN, schema).backend
        q, r = b.queue(), b.results()
        dead = await _dead(q, "one")
        outcome = ok(dead.id)
        await r.store(outcome)
        t = Task(func="m:f", queue="one")
        await q.enqueue(t)
        d = await q.dequeue(["one"], 30, 0)
        sent = _count_statements(b)
        await q.release(d, 30)
        await q.failed()
        await q.failed(queue="one", limit=1)
        assert await q.forget([dead.id, t.id]) == 1
        await q.put_record("cancel", dead.id, b"{}")
        await q.get_record("cancel", dead.id)
        await q.list_records("cancel")
        await q.delete_record("cancel", dead.id)
        assert await r.get_many([dead.id, t.id, dead.id]) == {dead.id: outcome}
        assert dict(sent) == {
            "release": 1, "failed": 1, "failed_queue": 1, "forget": 1, "put_record": 1,
            "get_record": 1, "list_records": 1, "delete_record": 1, "get_results": 1,
        }
        sent.clear()  # nothing to ask: no round trip
        assert await r.get_many([]) == {} and await q.forget([]) == 0
        assert await q.get_record("cancel", "no spaces") is None
        assert await q.list_records("no/kind") == []
        assert await q.delete_record("cancel", "") is False
        assert dict(sent) == {}
        stats = {s.queue: s for s in await q.stats()}
        assert (stats["one"].scheduled, stats["one"].running) == (1, 0)
        await q.close()

    run(body)


def test_records_are_listed_in_code_point_order(schema: str) -> None:
    """Whatever the database's collation: the records table's columns are "C"."""
    names = ["b", "B", "a", "a_b", "a-b", "a.b", "9", "A:1", "a=b", "aB", "Zz", "a9"]

    async def body() -> None:
        q = make("queue", DSN, schema)
        for name in names:
            await q.put_record("k", name, name.encode())
        assert await q.list_records("k") == [(n, n.encode()) for n in sorted(names)]
        await q.close()

    run(body)


def test_a_task_that_waits_for_others_gets_no_started_from_a_fused_claim(schema: str) -> None:
    """storage.runs_now holds back a task with `after`: it is not sealed at enqueue, so
    the fused claim leaves its STARTED to the worker, also when it is claimed again
    after a release with a delay."""

    async def body() -> None:
        b = make("queue", DSN, schema).backend
        first = Task(func="m:f", queue="dep")
        waits = Task(func="m:f", queue="dep", after=(first.id,))
        for t in (first, waits):
            await b.submit(t, TaskEvent(t.id, EventType.ENQUEUED, queue="dep"))
        assert _sql(schema, "SELECT digest IS NULL FROM {s}.tasks WHERE id = %s",
                    (waits.id,)) == [(True,)]
        sent = _count_statements(b)
        got = {d.task_id: d for d in await b.claim(["dep"], 30, 0, 2, "w1")}
        assert dict(sent) == {"claim_started": 1}
        assert [e.event_type for e in await b.events().get(waits.id)] == [EventType.ENQUEUED]
        assert len(await b.events().get(first.id)) == 2
        await b.queue().release(got[waits.id], 0.2)
        again = await b.claim(["dep"], 30, 5, 1, "w1")
        assert [(d.task_id, d.attempt) for d in again] == [(waits.id, 1)]
        assert [e.event_type for e in await b.events().get(waits.id)] == [EventType.ENQUEUED]
        await b.queue().close()

    run(body)


def test_a_claim_asleep_on_drained_queues_takes_a_task_released_with_a_delay(
    schema: str,
) -> None:
    """A release notifies even with a delay: a claim that found its queues drained
    (and would sleep until a notification) learns when the task falls due."""

    async def body() -> None:
        b = make("queue", DSN, schema, poll_interval=120).backend
        other = make("queue", DSN, schema, application_name="omniq-other")
        assert other.backend is not b
        t = Task(func="m:f", queue="later")
        await other.enqueue(t)
        d = await other.dequeue(["later"], 30, 0)
        assert d is not None
        assert await b.claim(["later"], 30, 0, 4, "w1") == []  # drained: quiet from now
        waiting = asyncio.create_task(b.claim(["later"], 30, 10, 4, "w1"))
        await asyncio.sleep(0.1)
        start = time.monotonic()
        await other.release(d, 0.5)
        got = await asyncio.wait_for(waiting, 5)
        assert [(x.task_id, x.attempt) for x in got] == [(t.id, 1)]
        assert 0.3 < time.monotonic() - start < 2
        for s in (b.queue(), other):
            await s.close()

    run(body)
