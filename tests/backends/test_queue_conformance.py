"""TaskQueue conformance: the same behaviour on every technology."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from omniq.models import Task, WorkerInfo, seconds_from_now, utcnow
from omniq.serialization import UNDECODABLE_FUNC

from .conftest import Harness

LEASE = 30.0


def task(queue: str = "default", **kw: Any) -> Task:
    return Task(func="omniq.examples:add", args=(1, 2), queue=queue, **kw)


def test_enqueue_then_dequeue_roundtrips_the_task(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = Task(
            func="omniq.examples:add",
            args=(1, [2, 3]),
            kwargs={"x": {"y": "z"}},
            max_retries=3,
            timeout=5.0,
            unique_key=None,
        )
        assert await q.enqueue(t) == t.id
        d = await q.dequeue(["default"], LEASE, 0)
        assert d is not None
        assert d.task == t
        assert d.attempt == 1
        assert await q.dequeue(["default"], LEASE, 0) is None

    queue_h.run(body)


def test_dequeue_on_empty_queue_waits_for_timeout(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await q.dequeue(["default"], LEASE, 0.3) is None
        assert loop.time() - start >= 0.25

    queue_h.run(body)


def test_blocked_dequeue_wakes_on_enqueue_from_another_handle(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        other = await queue_h.another()
        waiter = asyncio.create_task(q.dequeue(["default"], LEASE, 10))
        await asyncio.sleep(0.2)
        t = task()
        await other.enqueue(t)
        d = await asyncio.wait_for(waiter, 8)
        assert d is not None and d.task.id == t.id

    queue_h.run(body)


def test_fifo_within_same_priority(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        ids = [await q.enqueue(task()) for _ in range(5)]
        got = []
        for _ in ids:
            d = await q.dequeue(["default"], LEASE, 1)
            assert d is not None
            got.append(d.task.id)
        assert got == ids

    queue_h.run(body)


def test_higher_priority_first(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        low = await q.enqueue(task(priority=0))
        high = await q.enqueue(task(priority=10))
        mid = await q.enqueue(task(priority=5))
        order = []
        for _ in range(3):
            d = await q.dequeue(["default"], LEASE, 1)
            assert d is not None
            order.append(d.task.id)
        assert order == [high, mid, low]

    queue_h.run(body)


def test_queues_consumed_in_the_order_given(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        b = await q.enqueue(task("b"))
        a = await q.enqueue(task("a"))
        c = await q.enqueue(task("c"))
        order = []
        for _ in range(3):
            d = await q.dequeue(["a", "b"], LEASE, 0.5)
            order.append(d.task.id if d else None)
        assert order == [a, b, None]
        d = await q.dequeue(["c"], LEASE, 1)
        assert d is not None and d.task.id == c

    queue_h.run(body)


def test_delayed_task_waits_for_eta(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        later = await q.enqueue(task(eta=seconds_from_now(1.0)))
        now = await q.enqueue(task())
        d = await q.dequeue(["default"], LEASE, 0)
        assert d is not None and d.task.id == now
        assert await q.dequeue(["default"], LEASE, 0) is None
        d = await q.dequeue(["default"], LEASE, 5)
        assert d is not None and d.task.id == later

    queue_h.run(body)


def test_past_eta_runs_at_once(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = await q.enqueue(task(eta=utcnow() - timedelta(seconds=10)))
        d = await q.dequeue(["default"], LEASE, 1)
        assert d is not None and d.task.id == t

    queue_h.run(body)


def test_expired_lease_redelivers_with_higher_attempt(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = await q.enqueue(task())
        first = await q.dequeue(["default"], 1.0, 0)
        assert first is not None and first.attempt == 1
        assert await q.dequeue(["default"], 1.0, 0) is None
        second = await q.dequeue(["default"], LEASE, 6)
        assert second is not None
        assert second.task.id == t
        assert second.attempt == 2
        # The first holder lost its lease.
        assert await q.extend(first, LEASE) is False

    queue_h.run(body)


def test_extend_keeps_the_lease(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        await q.enqueue(task())
        d = await q.dequeue(["default"], 1.0, 0)
        assert d is not None
        for _ in range(3):
            await asyncio.sleep(0.5)
            assert await q.extend(d, 1.0) is True
        assert await q.dequeue(["default"], LEASE, 0) is None

    queue_h.run(body)


def test_ack_removes_the_task(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = await q.enqueue(task())
        d = await q.dequeue(["default"], 1.0, 0)
        assert d is not None
        await q.ack(d)
        assert await q.get_task(t) is None
        await asyncio.sleep(1.3)
        assert await q.dequeue(["default"], LEASE, 0) is None

    queue_h.run(body)


def test_failed_ack_keeps_a_dead_letter(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = await q.enqueue(task("dl"))
        d = await q.dequeue(["dl"], LEASE, 0)
        assert d is not None
        await q.ack(d, failed=True)
        kept = await q.get_task(t)
        assert kept is not None and kept.id == t
        stats = {s.queue: s for s in await q.stats()}
        assert stats["dl"].failed == 1
        assert stats["dl"].running == 0
        assert await q.dequeue(["dl"], LEASE, 0) is None
        assert await q.purge("dl") == 1
        assert await q.get_task(t) is None

    queue_h.run(body)


def test_retry_requeues_after_delay_and_counts_attempt(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = await q.enqueue(task())
        d = await q.dequeue(["default"], LEASE, 0)
        assert d is not None
        await q.retry(d, 0.8)
        assert await q.dequeue(["default"], LEASE, 0) is None
        again = await q.dequeue(["default"], LEASE, 5)
        assert again is not None and again.task.id == t and again.attempt == 2

    queue_h.run(body)


def test_release_hands_back_without_counting(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = await q.enqueue(task())
        d = await q.dequeue(["default"], LEASE, 0)
        assert d is not None
        await q.release(d)
        again = await q.dequeue(["default"], LEASE, 1)
        assert again is not None and again.task.id == t and again.attempt == 1

    queue_h.run(body)


def test_cancel_waiting_task(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = await q.enqueue(task())
        assert await q.cancel(t) is True
        assert await q.get_task(t) is None
        assert await q.dequeue(["default"], LEASE, 0) is None
        assert await q.cancel(t) is False

    queue_h.run(body)


def test_cancel_scheduled_task(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = await q.enqueue(task(eta=seconds_from_now(0.5)))
        assert await q.cancel(t) is True
        assert await q.dequeue(["default"], LEASE, 1.0) is None

    queue_h.run(body)


def test_cancel_running_task_is_refused(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = await q.enqueue(task())
        d = await q.dequeue(["default"], LEASE, 0)
        assert d is not None
        assert await q.cancel(t) is False
        assert await q.get_task(t) is not None

    queue_h.run(body)


def test_cancel_unknown_task(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        assert await q.cancel(task().id) is False

    queue_h.run(body)


def test_unique_key_dedupes_while_unfinished(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        first = await q.enqueue(task(unique_key="nightly"))
        second = await q.enqueue(task(unique_key="nightly"))
        assert second == first
        d = await q.dequeue(["default"], LEASE, 0)
        assert d is not None
        assert await q.enqueue(task(unique_key="nightly")) == first  # still running
        assert await q.dequeue(["default"], LEASE, 0) is None
        await q.ack(d)
        third = await q.enqueue(task(unique_key="nightly"))
        assert third != first

    queue_h.run(body)


def test_unique_key_is_held_for_unique_ttl_after_the_task_finished(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        first = await q.enqueue(task(unique_key="nightly-2030-01-31", unique_ttl=1.5))
        d = await q.dequeue(["default"], LEASE, 0)
        assert d is not None
        assert await q.ack(d) is True
        # Finished, but cron fires again the same day: still a duplicate.
        assert await q.enqueue(task(unique_key="nightly-2030-01-31", unique_ttl=1.5)) == first
        assert await q.dequeue(["default"], LEASE, 0) is None
        await asyncio.sleep(1.8)
        fresh = task(unique_key="nightly-2030-01-31", unique_ttl=1.5)
        assert await q.enqueue(fresh) == fresh.id

    queue_h.run(body)


def test_unique_key_of_a_dead_letter_is_held_for_unique_ttl(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        first = await q.enqueue(task(unique_key="once", unique_ttl=60))
        d = await q.dequeue(["default"], LEASE, 0)
        assert d is not None
        assert await q.ack(d, failed=True) is True
        assert await q.enqueue(task(unique_key="once", unique_ttl=60)) == first

    queue_h.run(body)


def test_unique_key_is_free_after_cancel(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        first = await q.enqueue(task(unique_key="k1"))
        assert await q.cancel(first)
        assert await q.enqueue(task(unique_key="k1")) != first

    queue_h.run(body)


def test_enqueue_of_the_same_id_is_idempotent(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = task()
        assert await q.enqueue(t) == t.id
        assert await q.enqueue(t) == t.id  # sent again after a lost reply
        d = await q.dequeue(["default"], LEASE, 0)
        assert d is not None and d.task.id == t.id
        assert await q.enqueue(t) == t.id  # running: left alone
        assert await q.dequeue(["default"], LEASE, 0) is None
        assert await q.ack(d) is True

    queue_h.run(body)


def test_enqueue_of_a_dead_letter_queues_it_again(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = task("dl2", max_retries=2)
        await q.enqueue(t)
        d = await q.dequeue(["dl2"], LEASE, 0)
        assert d is not None
        assert await q.ack(d, failed=True) is True
        assert await q.enqueue(t) == t.id
        stats = {s.queue: s for s in await q.stats()}
        assert (stats["dl2"].failed, stats["dl2"].queued) == (0, 1)
        again = await q.dequeue(["dl2"], LEASE, 0)
        assert again is not None and again.task.id == t.id and again.attempt == 1
        assert await q.ack(again) is True
        assert await q.get_task(t.id) is None

    queue_h.run(body)


def test_settling_a_lost_lease_changes_nothing(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = await q.enqueue(task())
        stalled = await q.dequeue(["default"], 1.0, 0)
        assert stalled is not None
        other = await queue_h.another()
        taker = await other.dequeue(["default"], LEASE, 8)  # the lease ran out
        assert taker is not None and taker.task.id == t and taker.attempt == 2
        # The stalled worker wakes up: none of its settlements may touch the task.
        assert await q.ack(stalled) is False
        assert await q.ack(stalled, failed=True) is False
        assert await q.retry(stalled, 0) is False
        await q.release(stalled)
        assert await q.extend(stalled, LEASE) is False
        assert await q.dequeue(["default"], LEASE, 0) is None
        stats = {s.queue: s for s in await q.stats()}
        assert (stats["default"].running, stats["default"].failed) == (1, 0)
        assert await other.extend(taker, LEASE) is True
        assert await other.ack(taker) is True
        assert await q.get_task(t) is None

    queue_h.run(body)


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfenot json", b"[1, 2]", b'{"v": 99, "id": "x"}', b'{"v": 1}'],
    ids=["bytes", "not-an-object", "newer-format", "missing-fields"],
)
def test_an_undecodable_task_is_delivered_with_its_problem(
    queue_h: Harness, payload: bytes
) -> None:
    corrupt = getattr(queue_h.tech, "corrupt_task", "missing")
    if corrupt is None:
        pytest.skip(f"{queue_h.name} keeps task objects, not bytes: nothing can be corrupted")
    assert corrupt != "missing", f"tech_{queue_h.name}.py must define corrupt_task"

    async def body(q: Any) -> None:
        bad, good = task("cq", priority=5), task("cq")
        await q.enqueue(bad)
        await q.enqueue(good)
        await corrupt(q, bad.id, bad.queue, payload)
        kept = await q.get_task(bad.id)  # no decode error escapes
        assert kept is not None and kept.id == bad.id and kept.func == UNDECODABLE_FUNC
        d = await q.dequeue(["cq"], LEASE, 0)
        assert d is not None and d.task.id == bad.id and d.task.queue == "cq"
        assert d.problem and d.task.func == UNDECODABLE_FUNC
        assert await q.ack(d, failed=True) is True
        after = await q.dequeue(["cq"], LEASE, 0)  # the queue goes on
        assert after is not None and after.task == good and after.problem is None
        stats = {s.queue: s for s in await q.stats()}
        assert stats["cq"].failed == 1

    queue_h.run(body)


def test_dequeue_many_takes_a_batch_in_order(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        tasks = [task("dm") for _ in range(5)]
        for t in tasks:
            await q.enqueue(t)
        urgent = task("dm", priority=5)
        await q.enqueue(urgent)
        got = await q.dequeue_many(["dm"], LEASE, 0, 4)
        assert [d.task.id for d in got] == [urgent.id, *(t.id for t in tasks[:3])]
        assert all(d.attempt == 1 for d in got)
        assert len({d.receipt for d in got}) == 4
        rest = await q.dequeue_many(["dm"], LEASE, 0, 10)
        assert [d.task.id for d in rest] == [t.id for t in tasks[3:]]
        for d in [*got, *rest]:
            assert await q.ack(d) is True

    queue_h.run(body)


def test_dequeue_many_waits_for_the_first_task_only(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await q.dequeue_many(["dw"], LEASE, 0.3, 5) == []
        assert loop.time() - start >= 0.25
        waiting = asyncio.create_task(q.dequeue_many(["dw"], LEASE, 5, 5))
        await asyncio.sleep(0.2)
        other = await queue_h.another()
        t = task("dw")
        await other.enqueue(t)
        got = await asyncio.wait_for(waiting, 5)
        assert [d.task.id for d in got] == [t.id]

    queue_h.run(body)


def test_stats_tell_since_when_the_oldest_ready_task_waits(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        before = utcnow()
        await q.enqueue(task("ow"))
        await asyncio.sleep(0.05)
        await q.enqueue(task("ow"))
        await q.enqueue(task("ow", eta=seconds_from_now(3600)))  # scheduled: not waiting
        await q.enqueue(task("ow2", eta=seconds_from_now(3600)))
        stats = {s.queue: s for s in await q.stats()}
        oldest = stats["ow"].oldest_ready_at
        assert oldest is not None
        assert before - timedelta(seconds=2) <= oldest <= before + timedelta(seconds=2)
        assert stats["ow2"].oldest_ready_at is None

    queue_h.run(body)


def test_release_with_a_delay_hands_back_later_without_counting(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = await q.enqueue(task("rd"))
        d = await q.dequeue(["rd"], LEASE, 0)
        assert d is not None
        await q.release(d, 0.8)
        assert await q.dequeue(["rd"], LEASE, 0) is None  # not yet
        stats = {s.queue: s for s in await q.stats()}
        assert (stats["rd"].scheduled, stats["rd"].running) == (1, 0)
        again = await q.dequeue(["rd"], LEASE, 5)
        assert again is not None and again.task.id == t and again.attempt == 1

    queue_h.run(body)


def test_failed_lists_dead_letters_newest_first_with_filters(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        kept = []
        for name in ("fa", "fa", "fb", "fa"):
            t = task(name)
            await q.enqueue(t)
            d = await q.dequeue([name], LEASE, 0)
            assert d is not None
            await q.ack(d, failed=True)
            kept.append(t)
            await asyncio.sleep(0.02)
        ok = await q.enqueue(task("fa"))  # waiting, not failed: never listed
        every = await q.failed()
        mine = [f for f in every if f.task.id in {t.id for t in kept}]
        assert [f.task.id for f in mine] == [t.id for t in reversed(kept)]
        assert all(f.failed_at.tzinfo is not None for f in mine)
        only_fa = await q.failed(queue="fa")
        assert [f.task.id for f in only_fa] == [kept[3].id, kept[1].id, kept[0].id]
        page = await q.failed(queue="fa", limit=2)
        assert [f.task.id for f in page] == [kept[3].id, kept[1].id]
        older = await q.failed(queue="fa", before=page[-1].failed_at, limit=2)
        assert [f.task.id for f in older] == [kept[0].id]
        recent = await q.failed(queue="fa", since=only_fa[1].failed_at)
        assert [f.task.id for f in recent] == [kept[3].id, kept[1].id]
        assert ok not in {f.task.id for f in every}

    queue_h.run(body)


def test_forget_deletes_dead_letters_only(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        dead, waiting = task("fg"), task("fg")
        await q.enqueue(dead)
        d = await q.dequeue(["fg"], LEASE, 0)
        assert d is not None
        await q.ack(d, failed=True)
        await q.enqueue(waiting)
        assert await q.forget([dead.id, waiting.id, task().id]) == 1
        assert await q.get_task(dead.id) is None
        assert await q.get_task(waiting.id) is not None
        assert await q.failed(queue="fg") == []

    queue_h.run(body)


def test_records_are_named_per_kind_and_shared(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        other = await queue_h.another()
        assert await q.get_record("schedule", "nightly") is None
        await q.put_record("schedule", "nightly", b'{"v": 1}')
        await q.put_record("schedule", "hourly.sync", b"\x00\xffbytes")
        await q.put_record("cancel", "nightly", b"other kind")
        assert await other.get_record("schedule", "nightly") == b'{"v": 1}'
        assert await other.list_records("schedule") == [
            ("hourly.sync", b"\x00\xffbytes"), ("nightly", b'{"v": 1}')
        ]
        await other.put_record("schedule", "nightly", b'{"v": 2}')  # replaced
        assert await q.get_record("schedule", "nightly") == b'{"v": 2}'
        assert await q.delete_record("schedule", "nightly") is True
        assert await q.delete_record("schedule", "nightly") is False
        assert await q.list_records("schedule") == [("hourly.sync", b"\x00\xffbytes")]
        assert await q.list_records("cancel") == [("nightly", b"other kind")]
        with pytest.raises(ValueError):
            await q.put_record("schedule", "no spaces", b"")

    queue_h.run(body)


def test_stats_per_queue_and_state(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        await q.enqueue(task("s1"))
        await q.enqueue(task("s1"))
        await q.enqueue(task("s1", eta=seconds_from_now(60)))
        await q.enqueue(task("s2"))
        d = await q.dequeue(["s2"], LEASE, 0)
        assert d is not None
        stats = {s.queue: s for s in await q.stats()}
        assert (stats["s1"].queued, stats["s1"].scheduled, stats["s1"].running) == (2, 1, 0)
        assert (stats["s2"].queued, stats["s2"].running) == (0, 1)

    queue_h.run(body)


def test_purge_drops_waiting_tasks_of_one_queue(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        for _ in range(3):
            await q.enqueue(task("p1"))
        keep = await q.enqueue(task("p2"))
        assert await q.purge("p1") == 3
        assert await q.dequeue(["p1"], LEASE, 0) is None
        d = await q.dequeue(["p2"], LEASE, 0)
        assert d is not None and d.task.id == keep

    queue_h.run(body)


def test_get_task_while_waiting_and_running(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        t = task(priority=3)
        await q.enqueue(t)
        assert await q.get_task(t.id) == t
        await q.dequeue(["default"], LEASE, 0)
        assert await q.get_task(t.id) == t

    queue_h.run(body)


def test_concurrent_consumers_never_share_a_task(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        ids = {await q.enqueue(task()) for _ in range(40)}
        handles = [q] + [await queue_h.another() for _ in range(3)]
        seen: list[str] = []

        async def consume(h: Any) -> None:
            while True:
                d = await h.dequeue(["default"], LEASE, 0.2)
                if d is None:
                    return
                seen.append(d.task.id)
                await h.ack(d)

        await asyncio.gather(*(consume(h) for h in handles))
        assert sorted(seen) == sorted(ids)

    queue_h.run(body)


def test_worker_registry(queue_h: Harness) -> None:
    async def body(q: Any) -> None:
        info = WorkerInfo(
            worker_id="w-1", host="h", pid=42, queues=("a", "b"), started_at=utcnow(),
            current_tasks=("x",), concurrency=4, tasks_done=7,
        )
        await q.register_worker(info, 30)
        workers = await q.workers()
        assert [w.worker_id for w in workers] == ["w-1"]
        assert workers[0].queues == ("a", "b") and workers[0].tasks_done == 7
        await q.register_worker(
            WorkerInfo(worker_id="w-2", host="h", pid=43, queues=("a",), started_at=utcnow()),
            1.0,
        )
        await asyncio.sleep(1.5)
        assert [w.worker_id for w in await q.workers()] == ["w-1"]
        await q.unregister_worker("w-1")
        assert await q.workers() == []

    queue_h.run(body)
