"""SQLite store methods of issue 11: release with a delay, dead letters by failure time,
forget, named records, results by the many; their cost in store calls; the migration."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from omniq import registry
from omniq.backends import sqlite as sqlite_backend
from omniq.backends.sqlite import (
    _FAILED_PAGE,
    _FAILED_TIES,
    _META_DDL,
    _QUEUE_SCHEMA,
    _RELEASED_SHIFT,
    SQLiteQueue,
    _from_micros,
    _micros,
)
from omniq.models import EventType, Task, TaskEvent, TaskResult, TaskStatus, new_task_id
from omniq.serialization import UNDECODABLE_FUNC, encode_task

LEASE = 60.0


def task(queue: str = "default", **kw: Any) -> Task:
    return Task(func="omniq.examples:add", args=(1, 2), queue=queue, **kw)


def _roles(base: Path) -> tuple[Any, Any, Any]:
    return tuple(  # type: ignore[return-value]
        registry.create("sqlite", role, {"path": str(base / f"{role}.db")})
        for role in ("queue", "results", "events")
    )


async def _dead(q: Any, t: Task) -> None:
    await q.enqueue(t)
    d = await q.dequeue([t.queue], LEASE, 0)
    assert d is not None and d.task_id == t.id
    assert await q.ack(d, failed=True)


def _sql(path: Path, statement: str, params: Any = ()) -> list[Any]:
    """What an operator's (or an older OmniQ's) connection to the file does."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        return conn.execute(statement, params).fetchall()
    finally:
        conn.close()


def _counted(q: Any) -> list[str]:
    """The names of the calls that reach the Backend's store thread from now on."""
    calls: list[str] = []
    threads = q.backend._threads
    submit = threads.submit

    def counted(job: Any) -> Any:
        calls.append(getattr(job.fn, "__name__", "?"))
        return submit(job)

    threads.submit = counted
    return calls


def test_a_release_with_a_delay_waits_it_and_does_not_go_first(tmp_path: Path) -> None:
    async def main() -> None:
        q = SQLiteQueue(database_path=tmp_path / "queue.db")
        held = task()
        await q.enqueue(held)
        d = await q.dequeue(["default"], LEASE, 0)
        assert d is not None
        await q.release(d, 0.3)
        await q.release(d, 0.0)  # handed back already: the lease fences it, nothing moves
        later = task()
        await q.enqueue(later)
        first = await q.dequeue(["default"], LEASE, 0)
        assert first is not None and first.task_id == later.id  # the released one waits
        await q.release(first)  # a release without a delay still goes first
        assert [t.id for t in await _take(q, 2)] == [later.id]
        await asyncio.sleep(0.35)
        again = await q.dequeue(["default"], LEASE, 0)
        assert again is not None and (again.task_id, again.attempt) == (held.id, 1)
        await q.close()

    asyncio.run(main())


async def _take(q: Any, n: int) -> list[Task]:
    return [d.task for d in await q.dequeue_many(["default"], LEASE, 0, n)]


def test_failed_pages_by_the_stored_microsecond_and_never_splits_a_tie(
    tmp_path: Path,
) -> None:
    path = tmp_path / "queue.db"

    async def main() -> None:
        q = SQLiteQueue(database_path=path)
        dead = [task("ta" if i % 3 else "tb") for i in range(7)]
        for t in dead:
            await _dead(q, t)
        # Three share one microsecond (one burst); the rest each their own.
        at = [1_700_000_000_000_000 + 10 * i for i in range(7)]
        at[2] = at[3] = at[4]
        for t, when in zip(dead, at, strict=True):
            _sql(path, "UPDATE omniq_tasks SET failed_at = ? WHERE id = ?", (when, t.id))
        every = await q.failed()
        assert [_micros(f.failed_at) for f in every] == sorted(at, reverse=True)
        assert all(f.failed_at == _from_micros(_micros(f.failed_at)) for f in every)
        page = await q.failed(limit=3)  # ends inside the tie: the tie comes whole
        assert [f.task.id for f in page] == [f.task.id for f in every[:5]]
        seen, before = [], None
        while True:
            part = await q.failed(before=before, limit=1)
            if not part:
                break
            seen += part
            before = part[-1].failed_at
        assert [f.task.id for f in seen] == [f.task.id for f in every]
        since = await q.failed(since=every[4].failed_at)  # inclusive
        assert [f.task.id for f in since] == [f.task.id for f in every[:5]]
        only_ta = await q.failed(queue="ta", limit=2)  # the second ends inside the tie
        in_ta = [f.task.id for f in every if f.task.queue == "ta"]
        assert [f.task.id for f in only_ta] == in_ta[:3]
        assert await q.failed(limit=0) == []
        await q.close()

    asyncio.run(main())


def test_failed_reads_only_the_failure_time_indexes(tmp_path: Path) -> None:
    async def main() -> None:
        q = SQLiteQueue(database_path=tmp_path / "queue.db")
        await q.open()
        params = {"queue": "x", "since": 0, "before": 2, "limit": 5, "at": 1, "last": "z"}
        for by_queue in (False, True):
            index = "omniq_tasks_failed_queue" if by_queue else "omniq_tasks_failed"
            for template in (_FAILED_PAGE[by_queue], _FAILED_TIES[by_queue]):
                sql = "EXPLAIN QUERY PLAN " + q._sql(template)
                plan = " | ".join(row[3] for row in await q._call(_plan, sql, params))
                assert plan.startswith(f"SEARCH queue.omniq_tasks USING INDEX {index} ("), plan
                assert "SCAN" not in plan and "TEMP B-TREE" not in plan, plan
        await q.close()

    asyncio.run(main())


def _plan(conn: sqlite3.Connection, sql: str, params: Any) -> list[Any]:
    return conn.execute(sql, params).fetchall()


def test_our_failure_time_is_kept_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trigger for older writers leaves a time we set alone."""
    monkeypatch.setattr(sqlite_backend, "_now_micros", lambda: 1_234_567_891_234_567)

    async def main() -> None:
        q = SQLiteQueue(database_path=tmp_path / "queue.db")
        t = task()
        await _dead(q, t)
        (f,) = await q.failed()
        assert (f.task, _micros(f.failed_at)) == (t, 1_234_567_891_234_567)
        await q.close()

    asyncio.run(main())


def test_undecodable_dead_letters_are_listed_as_placeholders_and_forgotten(
    tmp_path: Path,
) -> None:
    path = tmp_path / "queue.db"

    async def main() -> None:
        q = SQLiteQueue(database_path=path)
        bad, good = task("bq", unique_key="bad-key", unique_ttl=3600), task("bq")
        await _dead(q, bad)
        await _dead(q, good)
        _sql(path, "UPDATE omniq_tasks SET data = x'ff00' WHERE id = ?", (bad.id,))
        listed = {f.task.id: f.task for f in await q.failed(queue="bq")}
        assert listed[good.id] == good
        assert (listed[bad.id].func, listed[bad.id].queue) == (UNDECODABLE_FUNC, "bq")
        # Its payload is gone, yet its held key is freed (found by task id).
        assert await q.forget([bad.id]) == 1
        fresh = task("bq", unique_key="bad-key")
        assert await q.enqueue(fresh) == fresh.id
        assert [f.task.id for f in await q.failed(queue="bq")] == [good.id]
        await q.close()

    asyncio.run(main())


def test_forget_frees_held_keys_and_takes_many_ids_in_one_call(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"

    async def main() -> None:
        q = SQLiteQueue(database_path=path)
        held = task("fk", unique_key="nightly", unique_ttl=3600)
        other = task("fk", unique_key="other", unique_ttl=3600)
        await _dead(q, held)
        await _dead(q, other)
        again = task("fk", unique_key="nightly")
        assert await q.enqueue(again) == held.id  # the dead letter holds its key
        waiting = task("fk")
        await q.enqueue(waiting)
        noise = [new_task_id() for _ in range(1200)]  # three statements' worth of ids
        calls = _counted(q)
        assert await q.forget([*noise[:700], held.id, waiting.id, *noise[700:]]) == 1
        assert calls == ["_forget_here"]
        assert await q.enqueue(again) == again.id  # freed
        assert await q.get_task(waiting.id) == waiting  # not a dead letter: kept
        held_keys = _sql(path, "SELECT unique_key FROM omniq_unique_held")
        assert held_keys == [("other",)]  # the other dead letter's key stays held
        assert await q.forget([]) == 0
        await q.close()

    asyncio.run(main())


def test_each_operator_call_is_one_store_call(tmp_path: Path) -> None:
    async def main() -> None:
        q, r, e = _roles(tmp_path)
        for s in (q, r, e):
            await s.open()
        b = q.backend
        tasks = [task("oc") for _ in range(3)]
        for t in tasks:
            await b.submit(t, TaskEvent(t.id, EventType.ENQUEUED, queue=t.queue))
        got = await b.claim(["oc"], LEASE, 0, 3, "w1")
        for d in got:
            result = TaskResult(d.task_id, TaskStatus.FAILED, error_type="E", attempts=1)
            await b.finish(d, result, TaskEvent(d.task_id, EventType.FAILED), failed=True)
        ids = [t.id for t in tasks]
        calls = _counted(q)
        assert len(await q.failed("oc")) == 3
        assert set(await r.get_many([*ids, *(new_task_id() for _ in range(600))])) == set(ids)
        await q.put_record("cancel", tasks[0].id, b"{}")
        assert await q.list_records("cancel") == [(tasks[0].id, b"{}")]
        assert await q.get_record("cancel", tasks[0].id) == b"{}"
        assert await q.delete_record("cancel", tasks[0].id) is True
        assert await q.forget(ids) == 3
        assert calls == [
            "_failed_here", "_get_many_here", "_execute", "_fetchall", "_fetchone",
            "_execute", "_forget_here",
        ]
        sql = "EXPLAIN QUERY PLAN SELECT name, data FROM queue.omniq_records WHERE kind = ? " \
            "ORDER BY name"
        (plan,) = await q._call(_plan, sql, ("cancel",))
        assert plan[3].startswith("SEARCH queue.omniq_records USING PRIMARY KEY (kind=?)")
        for s in (q, r, e):
            await s.close()

    asyncio.run(main())


def test_a_fused_claim_stores_no_started_for_a_task_that_waits_for_others(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        q, r, e = _roles(tmp_path)
        b = q.backend
        first, waits = task("af"), task("af", after=("some-other-task",))
        for t in (first, waits):
            await b.submit(t, TaskEvent(t.id, EventType.ENQUEUED, queue=t.queue))
        got = await b.claim(["af"], LEASE, 0, 2, "w1")
        assert sorted(d.task_id for d in got) == sorted([first.id, waits.id])
        assert [ev.event_type for ev in await e.get(first.id)] == [
            EventType.ENQUEUED, EventType.STARTED
        ]
        assert [ev.event_type for ev in await e.get(waits.id)] == [EventType.ENQUEUED]
        for s in (q, r, e):
            await s.close()

    asyncio.run(main())


# --- migration from the queue schema of issue 10 --------------------------------------

# The statement an OmniQ of issue 10 acks a failure with: no failure time.
_OLD_ACK_FAILED = (
    "UPDATE omniq_tasks SET state = 2, lease_until = NULL, lease = NULL, unique_key = NULL "
    "WHERE id = ? AND token = ? AND state = 1"
)


def _issue10_queue_file(path: Path, rows: list[tuple[Task, int, float]]) -> None:
    """A queue file at schema version 2 holding `rows` of (task, state, ready_at)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(_META_DDL.format(s="main"))
    for step in _QUEUE_SCHEMA.steps[:2]:
        for statement in step:
            conn.execute(statement.format(s="main"))
    conn.execute("INSERT INTO omniq_schema VALUES ('queue', 2)")
    conn.executemany(
        "INSERT INTO omniq_tasks (id, queue, state, priority, ready_at, token, data) "
        "VALUES (?, ?, ?, 0, ?, 7, ?)",
        [(t.id, t.queue, state, ready, encode_task(t)) for t, state, ready in rows],
    )
    conn.close()


def test_a_queue_file_of_issue_10_is_migrated_and_an_older_writer_still_dates_failures(
    tmp_path: Path,
) -> None:
    path = tmp_path / "queue.db"
    dead, released_dead, waiting, running = task(), task(), task(), task()
    _issue10_queue_file(path, [
        (dead, 2, 1_700_000_000.25),
        (released_dead, 2, 1_700_000_100.5 - _RELEASED_SHIFT),
        (waiting, 0, 1_700_000_200.0),
        (running, 1, 1_700_000_300.0),
    ])

    async def main() -> None:
        q = SQLiteQueue(database_path=path)
        listed = await q.failed()
        # Dead letters of before get the time they last became ready.
        assert [(f.task.id, _micros(f.failed_at)) for f in listed] == [
            (released_dead.id, 1_700_000_100_500_000), (dead.id, 1_700_000_000_250_000),
        ]
        await q.put_record("schedule", "nightly", b"{}")
        assert await q.list_records("schedule") == [("nightly", b"{}")]
        # An OmniQ of issue 10 that opened the file before the upgrade fails a task.
        before = time.time()
        assert _sql(path, _OLD_ACK_FAILED + " RETURNING id", (running.id, 7)) == [
            (running.id,)
        ]
        newest = (await q.failed(limit=1))[0]
        assert newest.task.id == running.id
        assert before - 0.01 <= newest.failed_at.timestamp() <= time.time() + 0.01
        assert _micros(newest.failed_at) % 1000 == 0  # SQLite's clock: milliseconds
        # Queued again and failed again by it: a new time, not the old one.
        assert await q.enqueue(dead) == dead.id
        _sql(path, "UPDATE omniq_tasks SET state = 1 WHERE id = ?", (dead.id,))
        await asyncio.sleep(0.01)  # a later millisecond than the failure above
        _sql(path, _OLD_ACK_FAILED, (dead.id, 7))
        assert (await q.failed(limit=1))[0].task.id == dead.id
        await q.close()

    asyncio.run(main())
    (version,) = _sql(path, "SELECT version FROM omniq_schema WHERE component = 'queue'")[0]
    assert version == _QUEUE_SCHEMA.version == 3
