"""SQLite-only behaviour: schema and migration, disk space, locking, clock steps, processes."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from omniq import registry
from omniq.backends import sqlite as sqlite_backend
from omniq.backends.sqlite import (
    _EVENTS_SCHEMA,
    _META_DDL,
    _QUEUE_SCHEMA,
    _RESULTS_SCHEMA,
    SQLiteBackend,
    SQLiteEventStorage,
    SQLiteQueue,
    SQLiteResultStorage,
    _immediate,
)
from omniq.errors import BackendError, BackendUnavailable, ConfigError
from omniq.models import (
    EventType,
    Task,
    TaskEvent,
    TaskResult,
    TaskStatus,
    new_task_id,
    utcnow,
)
from omniq.serialization import encode_task
from omniq.storage import fused_ops

LEASE = 60.0


def ok(task_id: str | None = None, value: Any = None) -> TaskResult:
    return TaskResult(task_id=task_id or new_task_id(), status=TaskStatus.COMPLETED, value=value)


async def opened(store: Any) -> Any:
    await store.open()
    return store


# --- schema and files -------------------------------------------------------


def test_constructor_touches_nothing_and_open_creates_parent_dirs(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "results.db"
    store = SQLiteResultStorage(database_path=path)
    assert not (tmp_path / "a").exists()

    async def main() -> None:
        await store.open()
        await store.open()  # idempotent
        await store.store(ok(value=1))
        await store.close()
        await store.close()  # idempotent

    asyncio.run(main())
    assert path.is_file()


def test_schema_version_is_recorded_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"

    async def open_close() -> None:
        q = await opened(SQLiteQueue(database_path=path))
        await q.close()

    asyncio.run(open_close())
    with sqlite3.connect(path) as conn:
        (version,) = conn.execute(
            "SELECT version FROM omniq_schema WHERE component = 'queue'"
        ).fetchone()
        assert version >= 1
        conn.execute("UPDATE omniq_schema SET version = 999 WHERE component = 'queue'")
    conn.close()
    with pytest.raises(BackendError, match="newer OmniQ queue schema"):
        asyncio.run(open_close())


def test_three_roles_can_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "omniq.db"

    async def main() -> None:
        q = await opened(SQLiteQueue(database_path=path))
        r = await opened(SQLiteResultStorage(database_path=path))
        e = await opened(SQLiteEventStorage(database_path=path))
        t = Task(func="omniq.examples:add", args=(1, 2))
        await q.enqueue(t)
        d = await q.dequeue(["default"], LEASE, 0)
        assert d is not None
        await r.store(ok(t.id, 3))
        await e.append(TaskEvent(task_id=t.id, event_type=EventType.COMPLETED))
        await q.ack(d)
        got = await r.get(t.id)
        assert got is not None and got.value == 3
        assert [ev.event_type for ev in await e.get(t.id)] == [EventType.COMPLETED]
        for s in (q, r, e):
            await s.close()

    asyncio.run(main())


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)

    async def main() -> None:
        store = SQLiteEventStorage(database_path=path)
        try:
            with pytest.raises(BackendError, match=str(path)):
                await store.open()
        finally:
            await store.close()

    asyncio.run(main())


def test_unwritable_location_is_backend_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")

    async def main() -> None:
        store = SQLiteQueue(database_path=blocker / "sub" / "queue.db")
        try:
            with pytest.raises(BackendUnavailable):
                await store.open()
        finally:
            await store.close()

    asyncio.run(main())


def test_results_persist_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    r = ok(value={"k": [1, 2]})

    async def write() -> None:
        store = await opened(SQLiteResultStorage(database_path=path))
        await store.store(r)
        await store.close()

    async def read() -> TaskResult | None:
        store = await opened(SQLiteResultStorage(database_path=path))
        try:
            return await store.get(r.task_id)
        finally:
            await store.close()

    asyncio.run(write())
    assert asyncio.run(read()) == r


def test_store_reopens_lazily_after_close(tmp_path: Path) -> None:
    async def main() -> None:
        store = await opened(SQLiteEventStorage(database_path=tmp_path / "events.db"))
        await store.close()
        tid = new_task_id()
        await store.append(TaskEvent(task_id=tid, event_type=EventType.ENQUEUED))
        assert len(await store.get(tid)) == 1
        await store.close()

    asyncio.run(main())


# --- factory ------------------------------------------------------------------


def test_create_maps_settings(tmp_path: Path) -> None:
    q = registry.create("sqlite", "queue", {"path": str(tmp_path / "q.db")})
    assert isinstance(q, SQLiteQueue) and q.database_path == str(tmp_path / "q.db")
    r = registry.create("sqlite", "results", {"base_dir": str(tmp_path)})
    assert isinstance(r, SQLiteResultStorage)
    assert r.database_path == str(tmp_path / "results.db")
    e = registry.create(
        "sqlite", "events", {"path": str(tmp_path / "e.db"), "options": {"busy_timeout": 2}}
    )
    assert isinstance(e, SQLiteEventStorage) and e.busy_timeout == 2.0
    with pytest.raises(ConfigError, match="path"):
        registry.create("sqlite", "queue", {})
    with pytest.raises(ConfigError, match="bogus"):
        registry.create("sqlite", "queue", {"path": "x.db", "options": {"bogus": 1}})


# --- locking --------------------------------------------------------------------


def _hammer(path: Path, errors: list[BaseException], rounds: int) -> None:
    """One thread, its own event loop and its own handles: like another process."""

    async def main() -> None:
        own = SQLiteBackend(path, busy_timeout=0.2)  # not the process's shared one
        q, r, e = [await opened(s) for s in (own.queue(), own.results(), own.events())]
        try:
            for _ in range(rounds):
                await q.enqueue(Task(func="omniq.examples:add", args=(1, 2)))
                d = await q.dequeue(["default"], LEASE, 0.5)
                if d is None:
                    continue
                await e.append(TaskEvent(task_id=d.task_id, event_type=EventType.STARTED))
                await r.store(ok(d.task_id, 3))
                await e.append(TaskEvent(task_id=d.task_id, event_type=EventType.COMPLETED))
                await q.ack(d)
        finally:
            for s in (q, r, e):
                await s.close()

    try:
        asyncio.run(main())
    except BaseException as exc:
        errors.append(exc)


def _hold_write_locks(path: Path, stop: threading.Event, hold: float) -> None:
    """A foreign writer that now and then keeps each file locked longer than the
    stores' busy timeout."""
    conns = [
        sqlite3.connect(path / name, isolation_level=None, timeout=30)
        for name in ("queue.db", "results.db", "events.db")
    ]
    try:
        for _ in range(4):
            for conn in conns:
                conn.execute("BEGIN IMMEDIATE")
            time.sleep(hold)
            for conn in conns:
                conn.execute("COMMIT")
            if stop.wait(0.3):
                return
    finally:
        for conn in conns:
            conn.close()


def test_two_handles_hammering_one_file_never_see_database_is_locked(tmp_path: Path) -> None:
    async def create_files() -> None:
        for s in (
            SQLiteQueue(database_path=tmp_path / "queue.db"),
            SQLiteResultStorage(database_path=tmp_path / "results.db"),
            SQLiteEventStorage(database_path=tmp_path / "events.db"),
        ):
            await s.open()
            await s.close()

    asyncio.run(create_files())
    errors: list[BaseException] = []
    stop = threading.Event()
    # Held 0.35 s against a 0.2 s busy timeout: only the stores' own retry gets through.
    holder = threading.Thread(target=_hold_write_locks, args=(tmp_path, stop, 0.35))
    workers = [threading.Thread(target=_hammer, args=(tmp_path, errors, 150)) for _ in range(2)]
    holder.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    stop.set()
    holder.join(10)
    assert errors == []

    async def check() -> None:
        q = await opened(SQLiteQueue(database_path=tmp_path / "queue.db"))
        e = await opened(SQLiteEventStorage(database_path=tmp_path / "events.db"))
        stats = await q.stats()
        assert sum(s.running for s in stats) == 0
        rows = await e.read(None, 10_000)
        assert len(rows) == 2 * (300 - sum(s.queued for s in stats))
        await q.close()
        await e.close()

    asyncio.run(check())


# --- other processes ------------------------------------------------------------

_WRITER = """
import asyncio, sys
from omniq.backends.sqlite import SQLiteEventStorage, SQLiteQueue, SQLiteResultStorage
from omniq.models import EventType, Task, TaskEvent, TaskResult, TaskStatus

async def main(base, task_id):
    q = SQLiteQueue(database_path=base + "/queue.db")
    r = SQLiteResultStorage(database_path=base + "/results.db")
    e = SQLiteEventStorage(database_path=base + "/events.db")
    await q.enqueue(Task(func="omniq.examples:add", args=(2, 3), id=task_id, priority=7))
    await r.store(TaskResult(task_id=task_id, status=TaskStatus.COMPLETED, value=[5]))
    await e.append(TaskEvent(task_id=task_id, event_type=EventType.ENQUEUED, queue="default"))
    for s in (q, r, e):
        await s.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_reads_what_another_process_wrote(tmp_path: Path) -> None:
    task_id = new_task_id()
    subprocess.run([sys.executable, "-c", _WRITER, str(tmp_path), task_id], check=True, timeout=60)

    async def main() -> None:
        q = await opened(SQLiteQueue(database_path=tmp_path / "queue.db"))
        r = await opened(SQLiteResultStorage(database_path=tmp_path / "results.db"))
        e = await opened(SQLiteEventStorage(database_path=tmp_path / "events.db"))
        task = await q.get_task(task_id)
        assert task is not None and task.args == (2, 3) and task.priority == 7
        result = await r.wait(task_id, 5)
        assert result is not None and result.value == [5]
        assert [ev.event_type for ev in await e.get(task_id)] == [EventType.ENQUEUED]
        for s in (q, r, e):
            await s.close()

    asyncio.run(main())


def test_waiter_sees_a_result_stored_by_another_process(tmp_path: Path) -> None:
    task_id = new_task_id()

    async def main() -> None:
        r = await opened(SQLiteResultStorage(database_path=tmp_path / "results.db"))
        waiter = asyncio.create_task(r.wait(task_id, 30))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WRITER, str(tmp_path), task_id
        )
        assert await proc.wait() == 0
        got = await asyncio.wait_for(waiter, 30)
        assert got is not None and got.value == [5]
        await r.close()

    asyncio.run(main())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_reconnects_instead_of_sharing_the_parent_connection(
    tmp_path: Path,
) -> None:
    store = SQLiteResultStorage(database_path=tmp_path / "results.db")
    child_id = new_task_id()

    async def parent_first() -> None:
        await store.open()
        await store.store(ok(value="parent"))

    async def child() -> None:
        await store.store(ok(child_id, "child"))
        await store.close()

    asyncio.run(parent_first())
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            asyncio.run(child())
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    async def parent_after() -> None:
        got = await store.get(child_id)
        assert got is not None and got.value == "child"
        await store.close()

    asyncio.run(parent_after())


# --- cancellation -------------------------------------------------------------------


def test_cancelled_dequeue_does_not_strand_the_task(tmp_path: Path) -> None:
    async def main() -> None:
        q = await opened(SQLiteQueue(database_path=tmp_path / "queue.db"))
        for _ in range(20):
            t = await q.enqueue(Task(func="omniq.examples:add", args=(1, 2)))
            pending = asyncio.create_task(q.dequeue(["default"], LEASE, 5))
            await asyncio.sleep(0)
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            d = await q.dequeue(["default"], LEASE, 5)
            assert d is not None and d.task.id == t and d.attempt == 1
            await q.ack(d)
        await q.close()

    asyncio.run(main())


# --- group commit -------------------------------------------------------------------


def _half_done_then_fail(conn: sqlite3.Connection, task_id: str) -> None:
    with _immediate(conn):
        conn.execute(
            "INSERT INTO omniq_events (task_id, ts, data) VALUES (?, 0, x'7b7d')", (task_id,)
        )
        conn.execute("INSERT INTO no_such_table VALUES (1)")


def test_a_failing_write_in_a_shared_commit_fails_alone(tmp_path: Path) -> None:
    async def main() -> None:
        e = await opened(SQLiteEventStorage(database_path=tmp_path / "events.db"))
        good = [TaskEvent(task_id=new_task_id(), event_type=EventType.STARTED) for _ in range(30)]
        bad_id = new_task_id()
        calls = [e.append(ev) for ev in good[:15]]
        calls.append(e._write(_half_done_then_fail, bad_id))
        calls += [e.append(ev) for ev in good[15:]]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(outcomes[15], BackendError) and "no_such_table" in str(outcomes[15])
        assert [o for i, o in enumerate(outcomes) if i != 15] == [None] * 30
        assert await e.get(bad_id) == []  # its first statement was undone too
        for ev in good:
            assert await e.get(ev.task_id) == [ev]
        await e.close()

    asyncio.run(main())


def test_cleanup_larger_than_one_chunk(tmp_path: Path) -> None:
    async def main() -> None:
        e = await opened(SQLiteEventStorage(database_path=tmp_path / "events.db"))
        old = utcnow() - timedelta(days=3)
        await e.append_many(
            [TaskEvent(task_id=new_task_id(), event_type=EventType.ENQUEUED, timestamp=old)
             for _ in range(12_001)]
        )
        keep = TaskEvent(task_id=new_task_id(), event_type=EventType.ENQUEUED)
        await e.append(keep)
        assert await e.cleanup(utcnow() - timedelta(days=1)) == 12_001
        assert [ev for _, ev in await e.read(None, 100)] == [keep]
        await e.close()

    asyncio.run(main())


# --- group commit: conditional writes -----------------------------------------------


def test_conditional_writes_are_right_inside_a_shared_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups: list[int] = []
    run_grouped = sqlite_backend.SQLiteBackend._run_grouped

    def counted(self: Any, jobs: list[Any]) -> Any:
        groups.append(len(jobs))
        return run_grouped(self, jobs)

    monkeypatch.setattr(sqlite_backend.SQLiteBackend, "_run_grouped", counted)

    async def main() -> None:
        q = await opened(SQLiteQueue(database_path=tmp_path / "queue.db"))
        r = await opened(SQLiteResultStorage(database_path=tmp_path / "results.db"))
        e = await opened(SQLiteEventStorage(database_path=tmp_path / "events.db"))
        tid = new_task_id()
        won = await asyncio.gather(*(r.store(ok(tid, i)) for i in range(8)))
        assert won.count(True) == 1
        got = await r.get(tid)
        assert got is not None and got.value == won.index(True)

        event = TaskEvent(task_id=tid, event_type=EventType.STARTED)
        await asyncio.gather(*(e.append(event) for _ in range(5)))
        assert await e.get(tid) == [event]

        keyed = [Task(func="omniq.examples:add", unique_key="k", unique_ttl=60) for _ in range(6)]
        assert set(await asyncio.gather(*(q.enqueue(t) for t in keyed))) == {keyed[0].id}
        d = await q.dequeue(["default"], LEASE, 0)
        assert d is not None and await q.dequeue(["default"], LEASE, 0) is None
        settled = await asyncio.gather(
            q.ack(d), q.ack(d, failed=True), q.retry(d, 0), q.extend(d, LEASE)
        )
        assert settled == [True, False, False, False]
        assert await q.enqueue(keyed[1]) == keyed[0].id  # held for its unique_ttl
        assert await q.stats() == []
        for s in (q, r, e):
            await s.close()

    asyncio.run(main())
    assert max(groups) >= 2  # the calls above did share commits


# --- clock steps ------------------------------------------------------------------------


class _SteppedHost:
    """The `time` module as the SQLite backend sees it, where one store's thread runs on
    a host whose wall clock was stepped by `offset` seconds (its monotonic clock runs on)."""

    def __init__(self, offset: float) -> None:
        self.offset = offset
        self.thread: int | None = None

    def time(self) -> float:
        now = time.time()
        return now + self.offset if threading.get_ident() == self.thread else now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.parametrize("offset", [3600.0, -3600.0], ids=["ahead", "behind"])
def test_lease_expiry_survives_a_clock_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offset: float
) -> None:
    host = _SteppedHost(offset)
    monkeypatch.setattr(sqlite_backend, "time", host)

    async def main() -> None:
        # Two Backends of their own: two hosts.
        holder = await opened(SQLiteBackend(tmp_path).queue())
        other = await opened(SQLiteBackend(tmp_path).queue())
        host.thread = await other._call(lambda conn: threading.get_ident())
        task_id = await holder.enqueue(Task(func="omniq.examples:add", args=(1, 2)))
        d = await holder.dequeue(["default"], 1.0, 0)
        assert d is not None

        async def heartbeats() -> None:
            for _ in range(9):
                await asyncio.sleep(1.0 / 3)
                assert await holder.extend(d, 1.0) is True

        beating = asyncio.create_task(heartbeats())
        # A live holder keeps its task, whatever the other host's clock says.
        assert await other.dequeue(["default"], LEASE, 2.5) is None
        await beating
        # The holder stops beating (killed): the task is taken over after about its lease.
        since = time.monotonic()
        taken = await other.dequeue(["default"], LEASE, 10)
        waited = time.monotonic() - since
        assert taken is not None and (taken.task.id, taken.attempt) == (task_id, 2)
        assert 0.9 <= waited <= 1.0 + 1.0 + 1.5  # lease + one watch interval + slack
        for s in (holder, other):
            await s.close()

    asyncio.run(main())


# --- disk space and files made by the previous version ----------------------------------


def _db_bytes(base: Path) -> int:
    """What the stores hold on disk: each database file and its WAL."""
    return sum(p.stat().st_size for p in base.iterdir() if p.name.endswith((".db", ".db-wal")))


async def _three(base: Path) -> tuple[SQLiteQueue, SQLiteResultStorage, SQLiteEventStorage]:
    return (
        await opened(SQLiteQueue(database_path=base / "queue.db")),
        await opened(SQLiteResultStorage(database_path=base / "results.db")),
        await opened(SQLiteEventStorage(database_path=base / "events.db")),
    )


async def _purge_everything(
    q: SQLiteQueue, r: SQLiteResultStorage, e: SQLiteEventStorage
) -> None:
    later = utcnow() + timedelta(seconds=5)
    await q.purge()
    await r.cleanup(later, finished_before=later)
    await e.cleanup(later)


async def _round_of_tasks(
    q: SQLiteQueue, r: SQLiteResultStorage, e: SQLiteEventStorage, count: int
) -> None:
    tasks = [Task(func="omniq.examples:add", args=(i, "x" * 500)) for i in range(count)]
    await asyncio.gather(*(q.enqueue(t) for t in tasks))
    await e.append_many([TaskEvent(task_id=t.id, event_type=EventType.ENQUEUED) for t in tasks])

    async def run_one(i: int) -> None:
        d = await q.dequeue(["default"], LEASE, 0)
        assert d is not None
        await e.append(TaskEvent(task_id=d.task_id, event_type=EventType.STARTED))
        await r.store(ok(d.task_id, "y" * 500))
        await e.append(TaskEvent(task_id=d.task_id, event_type=EventType.COMPLETED))
        await q.ack(d, failed=i % 3 == 0)

    for start in range(0, count, 50):
        await asyncio.gather(*(run_one(i) for i in range(start, min(count, start + 50))))


def test_purge_gives_the_disk_space_back(tmp_path: Path) -> None:
    empty, used = tmp_path / "empty", tmp_path / "used"

    async def main() -> tuple[int, int, int]:
        stores = await _three(empty)
        await _purge_everything(*stores)
        empty_bytes = _db_bytes(empty)
        stores = await _three(used)
        for _ in range(2):
            await _round_of_tasks(*stores, 1500)
        full = _db_bytes(used)
        await _purge_everything(*stores)
        assert await stores[0].stats() == []
        after = _db_bytes(used)
        for s in stores:
            await s.close()
        return empty_bytes, full, after

    empty_bytes, full, after = asyncio.run(main())
    assert full > 10_000_000  # the rounds did fill the files
    assert after <= empty_bytes + 64 * 1024, (empty_bytes, full, after)


def _previous_version_file(path: Path, task: Task, dead_task: Task, event_data: bytes) -> None:
    """One file as the previous OmniQ left it: every role at schema version 1, no
    auto-vacuum, a waiting task, a task a dead worker held, an event without an id."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for schema in (_QUEUE_SCHEMA, _RESULTS_SCHEMA, _EVENTS_SCHEMA):
        for statement in (_META_DDL, *schema.steps[0]):
            conn.execute(statement.format(s="main"))
        conn.execute("INSERT INTO omniq_schema VALUES (?, 1)", (schema.component,))
    now = time.time()
    conn.execute(
        "INSERT INTO omniq_tasks (id, queue, state, priority, ready_at, data) "
        "VALUES (?, 'default', 0, 0, ?, ?)",
        (task.id, now, encode_task(task)),
    )
    conn.execute(
        "INSERT INTO omniq_tasks (id, queue, state, priority, ready_at, attempts, lease_until, "
        "token, data) VALUES (?, 'default', 1, 0, ?, 1, ?, 1, ?)",
        (dead_task.id, now, now + 3600, encode_task(dead_task)),
    )
    conn.execute(
        "INSERT INTO omniq_events (task_id, ts, data) VALUES (?, ?, ?)",
        (task.id, now, event_data),
    )
    conn.executemany(  # bulk, so that purge has pages to give back
        "INSERT INTO omniq_events (task_id, ts, data) VALUES ('old', 0, ?)",
        [(b"{}" + b" " * 1000,)] * 3000,
    )
    conn.close()


def test_a_file_of_the_previous_version_is_migrated_and_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "omniq.db"
    task = Task(func="omniq.examples:add", args=(1, 2))
    dead = Task(func="omniq.examples:add", args=(3, 4))
    old_event = (
        b'{"task_id":"%s","event_type":"enqueued","timestamp":1700000000.0,'
        b'"attempt":0,"worker_id":null,"queue":"default","details":{}}' % task.id.encode()
    )
    _previous_version_file(path, task, dead, old_event)

    async def main() -> None:
        q = await opened(SQLiteQueue(database_path=path))
        r = await opened(SQLiteResultStorage(database_path=path))
        e = await opened(SQLiteEventStorage(database_path=path))
        kept = await e.get(task.id)
        assert [ev.event_type for ev in kept] == [EventType.ENQUEUED]
        assert kept[0].id.startswith("legacy-") and (await e.get(task.id))[0].id == kept[0].id
        new = TaskEvent(task_id=task.id, event_type=EventType.STARTED, attempt=1)
        await e.append(new)
        await e.append(new)
        assert await e.get(task.id) == [kept[0], new]

        d = await q.dequeue(["default"], LEASE, 0)
        assert d is not None and (d.task, d.attempt) == (task, 1)
        # The dead worker's row names no lease length: ours (0.5 s) is watched for.
        taken = await q.dequeue(["default"], 0.5, 5)
        assert taken is not None and (taken.task, taken.attempt) == (dead, 2)
        assert await r.store(ok(task.id, 3)) is True
        assert await r.store(ok(task.id, 4)) is False

        # purge converts the file to incremental auto-vacuum, next to writes that share
        # commits (the VACUUM runs outside them), and gives the old events' pages back.
        assert _auto_vacuum(path) == 0
        before = path.stat().st_size
        await e.cleanup(utcnow() - timedelta(days=365 * 20))
        extra = [TaskEvent(task_id=new_task_id(), event_type=EventType.ENQUEUED) for _ in range(8)]
        await asyncio.gather(q.purge(), *(e.append(ev) for ev in extra))
        assert _auto_vacuum(path) == 2
        assert path.stat().st_size < before / 4
        for ev in extra:
            assert await e.get(ev.task_id) == [ev]
        for s in (q, r, e):
            await s.close()

    asyncio.run(main())
    with sqlite3.connect(path) as conn:
        versions = dict(conn.execute("SELECT component, version FROM omniq_schema"))
    conn.close()
    assert versions == {
        "queue": _QUEUE_SCHEMA.version, "results": _RESULTS_SCHEMA.version,
        "events": _EVENTS_SCHEMA.version,
    }


def _auto_vacuum(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
    finally:
        conn.close()


def test_a_solo_call_runs_outside_the_shared_commit(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    conn = sqlite3.connect(path, isolation_level=None)  # a file without auto-vacuum
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()

    async def main() -> None:
        e = await opened(SQLiteEventStorage(database_path=path))
        events = [TaskEvent(task_id=new_task_id(), event_type=EventType.STARTED) for _ in range(20)]
        calls = [e.append(ev) for ev in events[:10]]
        calls.append(e._give_space_back(always_convert=True))  # a VACUUM: never in a transaction
        calls += [e.append(ev) for ev in events[10:]]
        assert await asyncio.gather(*calls) == [None] * 21
        for ev in events:
            assert await e.get(ev.task_id) == [ev]
        await e.close()

    asyncio.run(main())
    assert _auto_vacuum(path) == 2


# --- one Backend per directory, fused operations ----------------------------------------


def _roles(base: Path, **kw: Any) -> tuple[Any, Any, Any]:
    return tuple(  # type: ignore[return-value]
        registry.create("sqlite", role, {"path": str(base / f"{role}.db"), **kw})
        for role in ("queue", "results", "events")
    )


def test_the_roles_of_one_directory_share_one_backend(tmp_path: Path) -> None:
    q, r, e = _roles(tmp_path / "home")
    assert q.backend is r.backend is e.backend
    assert fused_ops(q, r, e) is q.backend
    q2, _, _ = _roles(tmp_path / "home")
    assert q2 is not q and q2.backend is q.backend  # another client: its own handles
    elsewhere = registry.create("sqlite", "results", {"path": str(tmp_path / "x" / "r.db")})
    assert elsewhere.backend is not q.backend and fused_ops(q, elsewhere, e) is None
    # A second file set in the same directory gets a Backend of its own.
    other = registry.create("sqlite", "queue", {"path": str(tmp_path / "home" / "q2.db")})
    assert other.backend is not q.backend
    slower = registry.create(
        "sqlite", "queue", {"path": str(tmp_path / "home" / "queue.db"),
                            "options": {"busy_timeout": 1}}
    )
    assert slower.backend is not q.backend


def test_unknown_settings_are_refused_naming_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'url'.*base_dir, options, path"):
        registry.create("sqlite", "queue", {"path": str(tmp_path / "q.db"), "url": "x://"})


def test_one_call_and_one_transaction_per_fused_operation(tmp_path: Path) -> None:
    async def main() -> None:
        q, r, e = _roles(tmp_path)
        for s in (q, r, e):
            await s.open()
        b = q.backend
        statements: list[str] = []
        await q._call(lambda conn: conn.set_trace_callback(statements.append))
        calls: list[str] = []
        submit = b._threads.submit

        def counted(job: Any) -> Any:
            calls.append(job.fn.__name__)
            return submit(job)

        b._threads.submit = counted
        t = Task(func="omniq.examples:add", args=(1, 2))
        await b.submit(t, TaskEvent(t.id, EventType.ENQUEUED, queue=t.queue))
        (d,) = await b.claim(["default"], LEASE, 0, 5, "w1")
        result = TaskResult(t.id, TaskStatus.COMPLETED, value=3, attempts=1)
        assert await b.finish(d, result, TaskEvent(t.id, EventType.COMPLETED), failed=False)
        assert calls == ["_submit_here", "_claim_here", "_finish_here"]
        transactions = [x for x in statements if x in ("BEGIN IMMEDIATE", "COMMIT")]
        assert transactions == ["BEGIN IMMEDIATE", "COMMIT"] * 3
        assert [ev.event_type for ev in await e.get(t.id)] == [
            EventType.ENQUEUED, EventType.STARTED, EventType.COMPLETED
        ]
        for s in (q, r, e):
            await s.close()

    asyncio.run(main())


def test_a_cancelled_fused_claim_hands_its_tasks_back(tmp_path: Path) -> None:
    async def main() -> None:
        q, r, e = _roles(tmp_path)
        b = q.backend
        for _ in range(10):
            tasks = [Task(func="omniq.examples:add", args=(1, 2)) for _ in range(3)]
            for t in tasks:
                await b.submit(t, TaskEvent(t.id, EventType.ENQUEUED, queue=t.queue))
            pending = asyncio.create_task(b.claim(["default"], LEASE, 5, 3, "gone"))
            await asyncio.sleep(0)
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            got = await b.claim(["default"], LEASE, 5, 3, "w1")
            assert sorted(d.task.id for d in got) == sorted(t.id for t in tasks)
            assert all(d.attempt == 1 for d in got)
            for d in got:
                assert await q.ack(d)
        for s in (q, r, e):
            await s.close()

    asyncio.run(main())


def test_roles_bound_later_are_attached_in_the_one_order(tmp_path: Path) -> None:
    def attached(conn: sqlite3.Connection) -> list[str]:
        return [Path(row[2]).name for row in conn.execute("PRAGMA database_list") if row[2]]

    async def main() -> None:
        b = SQLiteBackend(tmp_path)
        q = await opened(b.queue())
        assert await q._call(attached) == ["queue.db"]
        r = await opened(b.results())
        e = await opened(b.events())
        # Lock and commit order: a result before its event before the ack.
        assert await q._call(attached) == ["results.db", "events.db", "queue.db"]
        for s in (q, r, e):
            await s.close()

    asyncio.run(main())


def test_fused_operations_on_one_file_holding_every_role(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "omniq.db"
        q = await opened(SQLiteQueue(database_path=path))
        r = await opened(SQLiteResultStorage(database_path=path))
        e = await opened(SQLiteEventStorage(database_path=path))
        b = fused_ops(q, r, e)
        assert b is q.backend
        t = Task(func="omniq.examples:add", args=(1, 2))
        await b.submit(t, TaskEvent(t.id, EventType.ENQUEUED, queue=t.queue))
        (d,) = await b.claim(["default"], LEASE, 0, 2, "w1")
        result = TaskResult(t.id, TaskStatus.COMPLETED, value=3, attempts=1)
        assert await b.finish(d, result, TaskEvent(t.id, EventType.COMPLETED), failed=False)
        assert await r.wait(t.id, 1) == result
        assert len(await e.get(t.id)) == 3 and await q.stats() == []
        for s in (q, r, e):
            await s.close()

    asyncio.run(main())


def test_a_released_task_goes_first_and_waits_since_it_was_ready(tmp_path: Path) -> None:
    async def main() -> None:
        q = await opened(SQLiteQueue(database_path=tmp_path / "queue.db"))
        before = utcnow()
        first = Task(func="omniq.examples:add", args=(1, 2))
        await q.enqueue(first)
        await asyncio.sleep(0.05)
        later = [Task(func="omniq.examples:add", args=(i, 2)) for i in range(3)]
        for t in later:
            await q.enqueue(t)
        (a, b) = await q.dequeue_many(["default"], LEASE, 0, 2)
        await q.release(b)
        await q.release(a)
        got = await q.dequeue_many(["default"], LEASE, 0, 5)
        assert [d.task.id for d in got] == [first.id, later[0].id, later[1].id, later[2].id]
        for d in got[2:]:
            await q.release(d)
        (stats,) = await q.stats()
        oldest = stats.oldest_ready_at
        assert oldest is not None and oldest > before - timedelta(seconds=1)
        assert oldest >= before + timedelta(seconds=0.04)  # later[1]'s enqueue, not 1970
        await q.close()

    asyncio.run(main())


def test_an_in_memory_store_has_a_private_backend(tmp_path: Path) -> None:
    async def main() -> None:
        q = await opened(SQLiteQueue(database_path=":memory:"))
        other = await opened(SQLiteQueue(database_path=":memory:"))
        assert q.backend is not other.backend
        r = await opened(q.backend.results())  # the other roles live in the same memory
        e = await opened(q.backend.events())
        b = fused_ops(q, r, e)
        assert b is q.backend
        t = Task(func="omniq.examples:add", args=(1, 2))
        await b.submit(t, TaskEvent(t.id, EventType.ENQUEUED, queue=t.queue))
        assert await other.get_task(t.id) is None
        (d,) = await b.claim(["default"], LEASE, 0, 1, "w1")
        assert await b.finish(d, ok(t.id, 3), TaskEvent(t.id, EventType.COMPLETED), failed=False)
        assert [ev.event_type for ev in await e.get(t.id)] == [
            EventType.ENQUEUED, EventType.STARTED, EventType.COMPLETED
        ]
        for s in (q, other, r, e):
            await s.close()

    asyncio.run(main())
    assert not any(tmp_path.iterdir()) and not Path(":memory:").exists()


def test_checkpoints_run_on_their_own_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_backend, "_CHECKPOINT_EVERY", 10)
    ran: list[str] = []
    checkpoint = sqlite_backend.SQLiteBackend._checkpoint

    def recorded(self: Any, jobs: list[Any]) -> Any:
        ran.append(threading.current_thread().name)
        return checkpoint(self, jobs)

    monkeypatch.setattr(sqlite_backend.SQLiteBackend, "_checkpoint", recorded)

    async def main() -> None:
        e = await opened(SQLiteEventStorage(database_path=tmp_path / "events.db"))
        for _ in range(25):
            await e.append(TaskEvent(task_id=new_task_id(), event_type=EventType.ENQUEUED))
        await e.close()  # waits for the checkpoint thread too

    asyncio.run(main())
    assert ran == ["omniq-sqlite-checkpoint"] * 2
    conn = sqlite3.connect(tmp_path / "events.db")
    try:
        assert conn.execute("SELECT count(*) FROM omniq_events").fetchone() == (25,)
    finally:
        conn.close()
