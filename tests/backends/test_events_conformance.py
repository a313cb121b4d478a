"""EventStorage conformance: the same behaviour on every technology."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from omniq.models import EventFilter, EventType, TaskEvent, new_task_id, utcnow
from omniq.storage import follow_events

from .conftest import Harness


def ev(task_id: str, kind: EventType = EventType.ENQUEUED, **kw: Any) -> TaskEvent:
    return TaskEvent(task_id=task_id, event_type=kind, **kw)


def test_append_and_get_in_order(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        tid, other = new_task_id(), new_task_id()
        e1 = ev(tid, EventType.ENQUEUED, queue="q", details={"func": "m:f"})
        e2 = ev(tid, EventType.STARTED, attempt=1, worker_id="w1", queue="q")
        e3 = ev(tid, EventType.COMPLETED, attempt=1, worker_id="w1", queue="q",
                details={"duration": 0.25})
        await s.append(e1)
        await s.append(ev(other))
        await s.append_many([e2, e3])
        assert await s.get(tid) == [e1, e2, e3]
        assert [e.event_type for e in await s.get(other)] == [EventType.ENQUEUED]
        assert await s.get(new_task_id()) == []

    events_h.run(body)


def test_an_event_sent_again_is_stored_once(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        tid = new_task_id()
        first, second = ev(tid), ev(tid, EventType.STARTED, attempt=1)
        assert first.id != second.id
        await s.append(first)
        await s.append(first)  # the reply of the first write was lost: written again
        other = await events_h.another()
        await other.append_many([first, second, second])
        got = await s.get(tid)
        assert [e.id for e in got] == [first.id, second.id]
        assert got == [first, second]
        start = None
        rows = [e for _, e in await s.read(start, 1000) if e.task_id == tid]
        assert [e.id for e in rows] == [first.id, second.id]

    events_h.run(body)


def test_timestamps_are_aware_utc(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        tid = new_task_id()
        await s.append(ev(tid))
        (got,) = await s.get(tid)
        assert got.timestamp.tzinfo is not None
        assert got.timestamp.utcoffset() == timedelta(0)

    events_h.run(body)


def test_read_with_cursor_resumes(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        start = await s.last_cursor()
        tids = [new_task_id() for _ in range(7)]
        for t in tids:
            await s.append(ev(t))
        rows = await s.read(start, 4)
        assert [e.task_id for _, e in rows] == tids[:4]
        rows2 = await s.read(rows[-1][0], 100)
        assert [e.task_id for _, e in rows2] == tids[4:]
        assert await s.read(rows2[-1][0], 100) == []
        assert await s.last_cursor() == rows2[-1][0]

    events_h.run(body)


def test_read_from_none_starts_at_oldest(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        tids = [new_task_id() for _ in range(3)]
        for t in tids:
            await s.append(ev(t))
        rows = await s.read(None, 100)
        assert [e.task_id for _, e in rows][-3:] == tids

    events_h.run(body)


def test_follow_sees_events_from_another_handle(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        other = await events_h.another()
        start = await s.last_cursor()
        tid = new_task_id()
        got: list[TaskEvent] = []

        async def follower() -> None:
            async for _, e in follow_events(s, start, EventFilter(task_id=tid), idle_wait=0.2):
                got.append(e)
                if len(got) == 2:
                    return

        f = asyncio.create_task(follower())
        await asyncio.sleep(0.2)
        await other.append(ev(new_task_id()))
        await other.append(ev(tid, EventType.ENQUEUED))
        await other.append(ev(tid, EventType.STARTED))
        await asyncio.wait_for(f, 10)
        assert [e.event_type for e in got] == [EventType.ENQUEUED, EventType.STARTED]

    events_h.run(body)


def test_wait_new_returns_early_when_events_exist(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        start = await s.last_cursor()
        await s.append(ev(new_task_id()))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await s.wait_new(start, 20)
        assert loop.time() - t0 < 10

    events_h.run(body)


def test_cleanup_removes_old_events(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        old_t, new_t = new_task_id(), new_task_id()
        await s.append(ev(old_t, timestamp=utcnow() - timedelta(days=3)))
        await s.append(ev(new_t))
        removed = await s.cleanup(utcnow() - timedelta(days=1))
        assert removed >= 1
        assert await s.get(old_t) == []
        assert len(await s.get(new_t)) == 1

    events_h.run(body)


def test_details_round_trip(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        tid = new_task_id()
        details = {"error": "ValueError: x", "delay": 1.5, "nested": {"a": [1, 2]}}
        await s.append(ev(tid, EventType.RETRIED, attempt=2, details=details))
        (got,) = await s.get(tid)
        assert got.details == details and got.attempt == 2

    events_h.run(body)


async def _append_tasks(s: Any, n: int) -> list[str]:
    tids = [new_task_id() for _ in range(n)]
    for t in tids:
        await s.append(ev(t))
    return tids


def test_latest_on_empty_store(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        assert await s.latest(5) == []

    events_h.run(body)


def test_latest_returns_newest_oldest_first_with_read_cursors(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        tids = await _append_tasks(s, 7)
        rows = await s.latest(3)
        assert [e.task_id for _, e in rows] == tids[4:]
        assert rows == (await s.read(None, 100))[-3:]
        assert rows[-1][0] == await s.last_cursor()
        assert await s.read(rows[-1][0], 10) == []
        assert await s.latest(0) == []

    events_h.run(body)


def test_read_continues_exactly_after_latest(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        await _append_tasks(s, 4)
        rows = await s.latest(2)
        later = await _append_tasks(s, 3)
        assert [e.task_id for _, e in await s.read(rows[-1][0], 10)] == later

    events_h.run(body)


def test_latest_pages_backwards_with_before(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        tids = await _append_tasks(s, 25)
        pages: list[list[tuple[str, TaskEvent]]] = []
        before = None
        while page := await s.latest(10, before):
            pages.append(page)
            before = page[0][0]
        assert [len(p) for p in pages] == [10, 10, 5]
        rows = [row for page in reversed(pages) for row in page]
        assert [e.task_id for _, e in rows] == tids
        assert rows == await s.read(None, 100)
        assert await s.latest(10, rows[0][0]) == []

    events_h.run(body)


def test_latest_with_limit_larger_than_log(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        tids = await _append_tasks(s, 4)
        rows = await s.latest(100)
        assert [e.task_id for _, e in rows] == tids
        assert [e.task_id for _, e in await s.latest(100, rows[2][0])] == tids[:2]

    events_h.run(body)


def test_latest_skips_cleaned_up_events(events_h: Harness) -> None:
    async def body(s: Any) -> None:
        old = ev(new_task_id(), timestamp=utcnow() - timedelta(days=3))
        tids = await _append_tasks(s, 2)
        await s.append(old)
        fresh = await _append_tasks(s, 2)
        await s.cleanup(utcnow() - timedelta(days=1))
        assert [e.task_id for _, e in await s.latest(3)] == [tids[1], *fresh]
        assert await s.latest(10) == await s.read(None, 10)

    events_h.run(body)
