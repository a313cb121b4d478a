"""PostgreSQL under a lossy network: every write that may be sent twice is stored once.

The stores talk to the shared server through tests/faultproxy.py, which loses a
request, loses its reply (the server did the work, the client never hears of it) or
holds the reply past the client's reply timeout. Each fault is aimed at one
statement by a string only that statement carries (a task id, an event id, a queue
name): the stores' own statements (release with a delay and forget among them), then
the Backend's fused ones (submit, a batch claim with its STARTED events, finish).
Then a real Worker, on one Backend so it uses the fused operations, runs 200 tasks
with faults at random on every connection.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from omniq import registry
from omniq.errors import BackendUnavailable
from omniq.models import EventType, Task, TaskEvent, TaskResult, TaskStatus, new_task_id
from omniq.storage import fused_ops
from omniq.worker import Worker, WorkerSettings
from tests.faultproxy import FaultProxy
from tests.servers import require

from . import tech_postgres

psycopg = pytest.importorskip("psycopg")

DSN = tech_postgres.DSN
REPLY_TIMEOUT = 1.0  # the stores' command_timeout: a delayed reply outlasts it
LATE = 2.5  # seconds a delayed reply is held
LEASE = 30.0
FAULTS = ("lose_request", "lose_reply", "delay_reply")


@pytest.fixture
def schema() -> Iterator[str]:
    require(tech_postgres.unavailable(), "PostgreSQL")
    name = "omniq_pf_" + uuid.uuid4().hex[:10]
    yield name
    tech_postgres.drop_schema(name)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(DSN)
    host = str(params.get("host") or "127.0.0.1")
    with FaultProxy(host, int(params.get("port") or 5432)) as p:
        yield p


def through(proxy: FaultProxy) -> str:
    """The test server's DSN, reached through the proxy."""
    from psycopg.conninfo import make_conninfo

    return make_conninfo(DSN, host="127.0.0.1", port=str(proxy.port))


def make(role: str, dsn: str, schema: str, **options: Any) -> Any:
    options = {"command_timeout": REPLY_TIMEOUT, "connect_timeout": 2, **options}
    return registry.create("postgres", role, {"dsn": dsn, "schema": schema, "options": options})


def make_backend(dsn: str, schema: str) -> Any:
    """The Backend holding all three roles, with its fused operations."""
    from omniq.backends.postgres import backend_for

    options = {"command_timeout": REPLY_TIMEOUT, "connect_timeout": 2}
    return backend_for({"dsn": dsn, "schema": schema, "options": options})


async def opened(backend: Any) -> Any:
    for store in (backend.queue(), backend.results(), backend.events()):
        await store.open()
    return backend


async def close(*backends: Any) -> None:
    for backend in backends:
        for store in (backend.queue(), backend.results(), backend.events()):
            await store.close()


def aim(proxy: FaultProxy, kind: str, match: bytes) -> None:
    if kind == "delay_reply":
        proxy.delay_reply(LATE, match=match)
    else:
        getattr(proxy, kind)(match=match)


def run(body: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout))


def add_task(queue: str, a: int = 1, b: int = 2) -> Task:
    return Task(func="omniq.examples:add", args=(a, b), queue=queue)


# --- one fault, one statement --------------------------------------------------------


@pytest.mark.parametrize("kind", FAULTS)
def test_a_claim_whose_reply_is_lost_is_found_again(
    kind: str, proxy: FaultProxy, schema: str
) -> None:
    async def body() -> None:
        q, direct = make("queue", through(proxy), schema), make("queue", DSN, schema)
        await q.open()
        queue = "claim-" + uuid.uuid4().hex[:8]
        t = add_task(queue)
        await direct.enqueue(t)
        aim(proxy, kind, queue.encode())
        with pytest.raises(BackendUnavailable):
            await q.dequeue([queue], LEASE, 0)
        assert proxy.injected[kind] == 1
        d = await q.dequeue([queue], LEASE, 0)
        # Delivered once, as attempt 1, whether the server had taken the lease or not.
        assert d is not None and d.task == t and d.attempt == 1
        assert await direct.dequeue([queue], LEASE, 0) is None
        assert await q.dequeue([queue], LEASE, 0) is None
        assert await q.extend(d, LEASE) is True
        assert await q.ack(d) is True
        assert await direct.get_task(t.id) is None
        for s in (q, direct):
            await s.close()

    run(body)


@pytest.mark.parametrize("kind", FAULTS)
def test_a_result_whose_reply_is_lost_is_stored_once(
    kind: str, proxy: FaultProxy, schema: str
) -> None:
    async def body() -> None:
        r, direct = make("results", through(proxy), schema), make("results", DSN, schema)
        await r.open()
        tid = new_task_id()
        mine = TaskResult(task_id=tid, status=TaskStatus.COMPLETED, value=3, worker_id="w1")
        aim(proxy, kind, tid.encode())
        with pytest.raises(BackendUnavailable):
            await r.store(mine)
        # Sent again, it is still this write's outcome: stored (once), and it says so.
        assert await r.store(mine) is True
        late = TaskResult(task_id=tid, status=TaskStatus.COMPLETED, value=4, worker_id="w2")
        assert await direct.store(late) is False
        assert await direct.get(tid) == mine
        for s in (r, direct):
            await s.close()

    run(body)


@pytest.mark.parametrize("many", [False, True], ids=["append", "append_many"])
@pytest.mark.parametrize("kind", FAULTS)
def test_an_event_whose_reply_is_lost_is_stored_once(
    kind: str, many: bool, proxy: FaultProxy, schema: str
) -> None:
    async def body() -> None:
        e, direct = make("events", through(proxy), schema), make("events", DSN, schema)
        await e.open()
        tid = new_task_id()
        events = [TaskEvent(task_id=tid, event_type=EventType.STARTED, attempt=1)]
        if many:
            events.append(TaskEvent(task_id=tid, event_type=EventType.COMPLETED, attempt=1))
        write = (lambda: e.append_many(events)) if many else (lambda: e.append(events[0]))
        aim(proxy, kind, events[0].id.encode())
        with pytest.raises(BackendUnavailable):
            await write()
        await write()
        assert [ev.id for ev in await direct.get(tid)] == [ev.id for ev in events]
        for s in (e, direct):
            await s.close()

    run(body)


@pytest.mark.parametrize("failed", [False, True], ids=["ack", "dead-letter"])
@pytest.mark.parametrize("kind", FAULTS)
def test_an_ack_whose_reply_is_lost_settles_once(
    kind: str, failed: bool, proxy: FaultProxy, schema: str
) -> None:
    async def body() -> None:
        q, direct = make("queue", through(proxy), schema), make("queue", DSN, schema)
        await q.open()
        queue = "ack-" + uuid.uuid4().hex[:8]
        t = add_task(queue)
        await direct.enqueue(t)
        d = await q.dequeue([queue], LEASE, 0)
        assert d is not None
        aim(proxy, kind, t.id.encode())
        with pytest.raises(BackendUnavailable):
            await q.ack(d, failed=failed)
        # Sent again: done by this call only if the first never reached the server.
        assert await q.ack(d, failed=failed) is (kind == "lose_request")
        stats = {s.queue: s for s in await direct.stats()}
        if failed:
            assert (stats[queue].running, stats[queue].failed) == (0, 1)
        else:
            assert queue not in stats and await direct.get_task(t.id) is None
        for s in (q, direct):
            await s.close()

    run(body)


def test_close_hands_back_a_claim_it_never_heard_of(proxy: FaultProxy, schema: str) -> None:
    async def body() -> None:
        q, direct = make("queue", through(proxy), schema), make("queue", DSN, schema)
        await q.open()
        queue = "gone-" + uuid.uuid4().hex[:8]
        t = add_task(queue)
        await direct.enqueue(t)
        proxy.lose_reply(match=queue.encode())
        with pytest.raises(BackendUnavailable):
            await q.dequeue([queue], LEASE, 0)
        await q.close()  # the worker stops before asking again
        d = await direct.dequeue([queue], LEASE, 0)  # at once, not after the lease
        assert d is not None and d.task.id == t.id and d.attempt == 1
        await direct.close()

    run(body)


@pytest.mark.parametrize("kind", FAULTS)
def test_a_release_with_a_delay_whose_reply_is_lost_hands_back_once(
    kind: str, proxy: FaultProxy, schema: str
) -> None:
    """Sent again, the release finds its lease gone: the attempt is not given back
    twice, and the delay stands."""

    async def body() -> None:
        q, direct = make("queue", through(proxy), schema), make("queue", DSN, schema)
        await q.open()
        queue = "rel-" + uuid.uuid4().hex[:8]
        t = add_task(queue)
        await direct.enqueue(t)
        d = await q.dequeue([queue], LEASE, 0)
        assert d is not None
        aim(proxy, kind, t.id.encode())
        with pytest.raises(BackendUnavailable):
            await q.release(d, 60)
        await q.release(d, 60)
        stats = {s.queue: s for s in await direct.stats()}
        assert (stats[queue].scheduled, stats[queue].running) == (1, 0)
        assert _task_row(schema, t.id) == (0, True)  # attempts, due in about a minute
        for s in (q, direct):
            await s.close()

    run(body)


@pytest.mark.parametrize("kind", FAULTS)
def test_a_forget_whose_reply_is_lost_deletes_once(
    kind: str, proxy: FaultProxy, schema: str
) -> None:
    async def body() -> None:
        q, direct = make("queue", through(proxy), schema), make("queue", DSN, schema)
        await q.open()
        queue = "fg-" + uuid.uuid4().hex[:8]
        t = add_task(queue)
        await direct.enqueue(t)
        d = await direct.dequeue([queue], LEASE, 0)
        assert d is not None and await direct.ack(d, failed=True) is True
        aim(proxy, kind, t.id.encode())
        with pytest.raises(BackendUnavailable):
            await q.forget([t.id])
        # Sent again: it deleted the dead letter only if the first never got there.
        assert await q.forget([t.id]) == (1 if kind == "lose_request" else 0)
        assert await direct.get_task(t.id) is None and await direct.failed(queue) == []
        for s in (q, direct):
            await s.close()

    run(body)


def _task_row(schema: str, task_id: str) -> tuple[int, bool]:
    from psycopg import sql

    query = sql.SQL("SELECT attempts, due > now() + interval '50 seconds' FROM {}.tasks"
                    " WHERE id = %s").format(sql.Identifier(schema))
    with psycopg.connect(DSN, autocommit=True) as conn:
        row = conn.execute(query, (task_id,)).fetchone()
    assert row is not None
    return int(row[0]), bool(row[1])


# --- the fused operations ----------------------------------------------------------


def enqueued(t: Task) -> TaskEvent:
    return TaskEvent(t.id, EventType.ENQUEUED, queue=t.queue)


def kinds_of(events: list[TaskEvent]) -> list[tuple[str, int]]:
    return [(e.event_type.value, e.attempt) for e in events]


@pytest.mark.parametrize("kind", FAULTS)
def test_a_fused_submit_whose_reply_is_lost_stores_one_task_and_one_event(
    kind: str, proxy: FaultProxy, schema: str
) -> None:
    async def body() -> None:
        b, direct = await opened(make_backend(through(proxy), schema)), make_backend(DSN, schema)
        t = add_task("submit-" + uuid.uuid4().hex[:8])
        aim(proxy, kind, t.id.encode())
        with pytest.raises(BackendUnavailable):
            await b.submit(t, enqueued(t))
        assert proxy.injected[kind] == 1
        assert await b.submit(t, enqueued(t)) == t.id  # sent again
        assert await direct.queue().get_task(t.id) == t
        assert kinds_of(await direct.events().get(t.id)) == [("enqueued", 0)]
        assert {s.queue: s.queued for s in await direct.queue().stats()}[t.queue] == 1
        await close(b, direct)

    run(body)


@pytest.mark.parametrize("kind", FAULTS)
def test_a_fused_batch_claim_whose_reply_is_lost_is_found_again(
    kind: str, proxy: FaultProxy, schema: str
) -> None:
    async def body() -> None:
        b, direct = await opened(make_backend(through(proxy), schema)), make_backend(DSN, schema)
        queue = "fclaim-" + uuid.uuid4().hex[:8]
        tasks = [add_task(queue, i) for i in range(3)]
        for t in tasks:
            await direct.submit(t, enqueued(t))
        aim(proxy, kind, queue.encode())
        with pytest.raises(BackendUnavailable):
            await b.claim([queue], LEASE, 0, 3, "w1")
        assert proxy.injected[kind] == 1
        got = await b.claim([queue], LEASE, 0, 3, "w1")
        # Each delivered once, as attempt 1, with one STARTED, whether the server had
        # taken the leases (and stored those events) or not.
        assert sorted(d.task.id for d in got) == sorted(t.id for t in tasks)
        assert {d.attempt for d in got} == {1}
        assert await direct.claim([queue], LEASE, 0, 3, "w2") == []
        for d in got:
            assert kinds_of(await direct.events().get(d.task_id)) == [
                ("enqueued", 0), ("started", 1)
            ]
            assert await b.queue().extend(d, LEASE) is True
        await close(b, direct)

    run(body)


@pytest.mark.parametrize("failed", [False, True], ids=["ack", "dead-letter"])
@pytest.mark.parametrize("kind", FAULTS)
def test_a_fused_finish_whose_reply_is_lost_settles_once(
    kind: str, failed: bool, proxy: FaultProxy, schema: str
) -> None:
    async def body() -> None:
        b, direct = await opened(make_backend(through(proxy), schema)), make_backend(DSN, schema)
        queue = "ffinish-" + uuid.uuid4().hex[:8]
        t = add_task(queue)
        await direct.submit(t, enqueued(t))
        (d,) = await b.claim([queue], LEASE, 0, 1, "w1")
        status = TaskStatus.FAILED if failed else TaskStatus.COMPLETED
        result = TaskResult(t.id, status, value=3, attempts=1, queue=queue, worker_id="w1")
        event = TaskEvent(t.id, EventType.FAILED if failed else EventType.COMPLETED,
                          attempt=1, queue=queue)
        aim(proxy, kind, t.id.encode())
        with pytest.raises(BackendUnavailable):
            await b.finish(d, result, event, failed=failed)
        assert proxy.injected[kind] == 1
        # Sent again: still this call's outcome, with one outcome event, settled once.
        assert await b.finish(d, result, event, failed=failed) is True
        assert await direct.results().get(t.id) == result
        assert [k for k, _ in kinds_of(await direct.events().get(t.id))] == [
            "enqueued", "started", event.event_type.value
        ]
        stats = {s.queue: s for s in await direct.queue().stats()}
        if failed:
            assert (stats[queue].running, stats[queue].failed) == (0, 1)
        else:
            assert queue not in stats
        await close(b, direct)

    run(body)


# --- a worker under random faults ----------------------------------------------------


def test_a_worker_under_chaos_leaves_one_outcome_per_task(
    proxy: FaultProxy, schema: str
) -> None:
    queue = "chaos-" + uuid.uuid4().hex[:8]
    tasks = [add_task(queue, i, 1000) for i in range(200)]

    async def body() -> None:
        direct = [make(role, DSN, schema) for role in ("queue", "results", "events")]
        stores = [make(role, through(proxy), schema) for role in ("queue", "results", "events")]
        for s in (*direct, *stores):
            await s.open()
        for t in tasks:
            await direct[0].enqueue(t)
        settings = WorkerSettings(queues=(queue,), concurrency=8, lease=LEASE, burst=True,
                                  poll_interval=0.2)
        worker = Worker(*stores, settings)
        assert fused_ops(*stores) is stores[0].backend  # the worker's fused operations
        # One Backend sends ~1.6 statements a task (4.4 before): a higher rate, and a
        # seed whose faults mix all three kinds (seed 7 lost one reply in 20 faults).
        proxy.chaos(0.08, kinds=FAULTS, delay=LATE, seed=2)
        try:
            await worker.run()
        finally:
            proxy.calm()
        assert sum(proxy.injected.values()) >= 20, proxy.injected  # the faults did happen
        await check_outcomes(*direct)
        for s in (*stores, *direct):
            await s.close()

    async def check_outcomes(q: Any, r: Any, e: Any) -> None:
        assert {s.queue: s for s in await q.stats()}.get(queue) is None  # nothing left
        for t in tasks:
            result = await r.get(t.id)
            assert result is not None and result.value == t.args[0] + 1000, t.id
            events = await e.get(t.id)
            kinds = Counter(ev.event_type for ev in events)
            assert kinds[EventType.COMPLETED] == 1, (t.id, events)
            assert len({ev.id for ev in events}) == len(events), (t.id, events)
            started = [ev.attempt for ev in events if ev.event_type == EventType.STARTED]
            assert len(started) == len(set(started)), (t.id, events)

    run(body, timeout=300)
