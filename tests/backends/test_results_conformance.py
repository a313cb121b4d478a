"""ResultStorage conformance: the same behaviour on every technology."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from omniq.models import TaskResult, TaskStatus, new_task_id, seconds_from_now, utcnow

from .conftest import Harness


def ok(task_id: str | None = None, **kw: Any) -> TaskResult:
    return TaskResult(task_id=task_id or new_task_id(), status=TaskStatus.COMPLETED, **kw)


def test_store_and_get_roundtrip(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        r = TaskResult(
            task_id=new_task_id(),
            status=TaskStatus.FAILED,
            value=None,
            error_type="ValueError",
            error_message="bad ünïcode",
            traceback="Traceback...\n",
            attempts=3,
            queue="q1",
            worker_id="w1",
            enqueued_at=utcnow(),
            started_at=utcnow(),
            expires_at=seconds_from_now(60),
        )
        await s.store(r)
        got = await s.get(r.task_id)
        assert got == r

    results_h.run(body)


def test_values_keep_their_json_shape(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        for value in [30, "hello", None, [1, "a", None], {"k": {"n": 1.5}}, True]:
            r = ok(value=value)
            await s.store(r)
            got = await s.get(r.task_id)
            assert got is not None and got.value == value

    results_h.run(body)


def test_get_unknown_is_none(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        assert await s.get(new_task_id()) is None

    results_h.run(body)


def test_wait_returns_at_once_when_present(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        r = ok(value=1)
        await s.store(r)
        assert await s.wait(r.task_id, 0) == r

    results_h.run(body)


def test_wait_times_out(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await s.wait(new_task_id(), 0.3) is None
        assert loop.time() - start >= 0.25

    results_h.run(body)


def test_wait_wakes_for_result_stored_by_another_handle(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        other = await results_h.another()
        r = ok(value="late")
        waiter = asyncio.create_task(s.wait(r.task_id, 10))
        await asyncio.sleep(0.2)
        await other.store(r)
        got = await asyncio.wait_for(waiter, 8)
        assert got is not None and got.value == "late"

    results_h.run(body)


def test_many_waiters_on_one_task(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        r = ok(value=5)
        waiters = [asyncio.create_task(s.wait(r.task_id, 10)) for _ in range(5)]
        await asyncio.sleep(0.1)
        await s.store(r)
        got = await asyncio.gather(*waiters)
        assert all(g is not None and g.value == 5 for g in got)

    results_h.run(body)


def test_delete(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        r = ok()
        await s.store(r)
        assert await s.delete(r.task_id) is True
        assert await s.get(r.task_id) is None
        assert await s.delete(r.task_id) is False

    results_h.run(body)


def test_expired_result_reads_as_none_and_cleanup_removes_it(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        old = ok(expires_at=utcnow() - timedelta(seconds=1))
        fresh = ok(expires_at=seconds_from_now(3600))
        forever = ok(expires_at=None)
        for r in (old, fresh, forever):
            await s.store(r)
        assert await s.get(old.task_id) is None
        assert await s.cleanup(utcnow()) >= 1
        assert await s.get(fresh.task_id) == fresh
        assert await s.get(forever.task_id) == forever
        assert await s.cleanup(utcnow() + timedelta(days=1)) >= 1
        assert await s.get(fresh.task_id) is None
        assert await s.get(forever.task_id) == forever

    results_h.run(body)


def test_get_many_reads_several_in_one_call(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        a, b = ok(value=1), ok(value=2)
        gone = ok(value=3, expires_at=utcnow() - timedelta(seconds=1))
        for r in (a, b, gone):
            await s.store(r)
        got = await s.get_many([a.task_id, b.task_id, gone.task_id, new_task_id()])
        assert got == {a.task_id: a, b.task_id: b}
        assert await s.get_many([]) == {}

    results_h.run(body)


def test_first_outcome_wins(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        tid = new_task_id()
        assert await s.store(ok(tid, value=1, worker_id="first")) is True
        late = await results_h.another()  # a stalled worker, in another process
        assert await late.store(ok(tid, value=2, worker_id="late")) is False
        assert await s.store(ok(tid, value=3)) is False
        got = await s.get(tid)
        assert got is not None and (got.value, got.worker_id) == (1, "first")

    results_h.run(body)


def test_delete_clears_the_way_for_a_new_outcome(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        tid = new_task_id()
        assert await s.store(TaskResult(tid, TaskStatus.FAILED, error_type="E")) is True
        assert await s.delete(tid) is True
        assert await s.store(ok(tid, value="again")) is True
        got = await s.get(tid)
        assert got is not None and got.value == "again"

    results_h.run(body)


def test_an_expired_result_does_not_block_a_new_one(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        tid = new_task_id()
        await s.store(ok(tid, value=1, expires_at=utcnow() + timedelta(milliseconds=300)))
        await asyncio.sleep(0.6)
        assert await s.store(ok(tid, value=2)) is True
        got = await s.get(tid)
        assert got is not None and got.value == 2

    results_h.run(body)


def test_racing_stores_leave_exactly_one_outcome(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        handles = [s, *[await results_h.another() for _ in range(5)]]
        for _ in range(3):
            tid = new_task_id()
            won = await asyncio.gather(
                *(h.store(ok(tid, value=i, worker_id=f"w{i}")) for i, h in enumerate(handles))
            )
            assert won.count(True) == 1, won
            got = await s.get(tid)
            assert got is not None and got.worker_id == f"w{won.index(True)}"

    results_h.run(body)


def test_cleanup_finished_before(results_h: Harness) -> None:
    async def body(s: Any) -> None:
        old = ok(finished_at=utcnow() - timedelta(days=2), expires_at=seconds_from_now(3600))
        new = ok(expires_at=seconds_from_now(3600))
        await s.store(old)
        await s.store(new)
        removed = await s.cleanup(utcnow(), finished_before=utcnow() - timedelta(days=1))
        assert removed >= 1
        assert await s.get(old.task_id) is None
        assert await s.get(new.task_id) == new

    results_h.run(body)
