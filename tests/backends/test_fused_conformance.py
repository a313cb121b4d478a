"""FusedOps conformance: one Backend holding all three roles writes in one round trip
what the generic path writes in several, with the same guarantees (omniq.storage)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from omniq.models import EventType, Task, TaskEvent, TaskResult, TaskStatus, utcnow
from omniq.storage import FusedOps, fused_ops, started_event

from .conftest import Harness

LEASE = 30.0


def task(queue: str = "fq", **kw: Any) -> Task:
    return Task(func="omniq.examples:add", args=(1, 2), queue=queue, **kw)


def enqueued(t: Task) -> TaskEvent:
    return TaskEvent(t.id, EventType.ENQUEUED, queue=t.queue, details={"func": t.func})


def kinds(events: list[TaskEvent]) -> list[tuple[str, int]]:
    return [(e.event_type.value, e.attempt) for e in events]


def done(d: Any, worker: str = "w1", value: Any = 3) -> tuple[TaskResult, TaskEvent]:
    result = TaskResult(d.task_id, TaskStatus.COMPLETED, value=value, attempts=d.attempt,
                        queue=d.task.queue, worker_id=worker)
    event = TaskEvent(d.task_id, EventType.COMPLETED, attempt=d.attempt, worker_id=worker,
                      queue=d.task.queue)
    return result, event


def test_the_worker_and_client_find_the_fused_operations(backend_h: Harness) -> None:
    async def body(b: Any) -> None:
        assert isinstance(b, FusedOps)
        assert fused_ops(b.queue(), b.results(), b.events()) is b
        other = await backend_h.another()  # the same place: the same Backend, or an equal one
        assert fused_ops(b.queue(), other.results(), b.events()) in (b, None)

    backend_h.run(body)


def test_submit_stores_the_task_and_its_enqueued_event(backend_h: Harness) -> None:
    async def body(b: Any) -> None:
        t = task()
        assert await b.submit(t, enqueued(t)) == t.id
        assert await b.queue().get_task(t.id) == t
        assert kinds(await b.events().get(t.id)) == [("enqueued", 0)]
        keyed = task(unique_key="once")
        assert await b.submit(keyed, enqueued(keyed)) == keyed.id
        dup = task(unique_key="once")
        assert await b.submit(dup, enqueued(dup)) == keyed.id  # held: nothing stored
        assert await b.events().get(dup.id) == []
        assert await b.queue().get_task(dup.id) is None

    backend_h.run(body)


def test_claim_takes_a_batch_and_stores_each_started(backend_h: Harness) -> None:
    async def body(b: Any) -> None:
        tasks = [task() for _ in range(5)]
        for t in tasks:
            await b.submit(t, enqueued(t))
        got = await b.claim(["fq"], LEASE, 0, 3, "w1")
        assert [d.task.id for d in got] == [t.id for t in tasks[:3]]
        for d in got:
            (_, started) = await b.events().get(d.task_id)
            assert started == replace(started_event(d, "w1"), timestamp=started.timestamp)
        rest = await b.claim(["fq"], LEASE, 0, 10, "w1")
        assert [d.task.id for d in rest] == [t.id for t in tasks[3:]]
        assert await b.claim(["fq"], LEASE, 0, 10, "w1") == []

    backend_h.run(body)


def test_claim_waits_for_the_first_task_only(backend_h: Harness) -> None:
    async def body(b: Any) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await b.claim(["fq"], LEASE, 0.3, 4, "w1") == []
        assert loop.time() - start >= 0.25
        t = task()
        waiting = asyncio.create_task(b.claim(["fq"], LEASE, 5, 4, "w1"))
        await asyncio.sleep(0.2)
        producer = await backend_h.another()
        await producer.submit(t, enqueued(t))
        got = await asyncio.wait_for(waiting, 5)
        assert [d.task.id for d in got] == [t.id]

    backend_h.run(body)


def test_claim_writes_no_started_for_a_task_the_worker_will_not_run(
    backend_h: Harness,
) -> None:
    async def body(b: Any) -> None:
        lost = task(max_retries=0)  # its one attempt's worker vanished
        expired = task(expires_at=utcnow())
        for t in (lost, expired):
            await b.submit(t, enqueued(t))
        first = await b.claim(["fq"], 0.5, 0, 1, "gone")
        assert [d.task.id for d in first] == [lost.id]
        await asyncio.sleep(0.7)  # the lease runs out (its worker vanished)
        got = await b.claim(["fq"], LEASE, 8, 2, "w2")
        assert {d.task.id for d in got} == {lost.id, expired.id}
        assert kinds(await b.events().get(lost.id)) == [("enqueued", 0), ("started", 1)]
        assert kinds(await b.events().get(expired.id)) == [("enqueued", 0)]

    backend_h.run(body)


def test_claim_settles_a_task_whose_result_is_stored(backend_h: Harness) -> None:
    async def body(b: Any) -> None:
        t = task(max_retries=3)
        await b.submit(t, enqueued(t))
        (d,) = await b.claim(["fq"], 0.5, 0, 1, "w1")
        # Its worker stored the result and died before the ack.
        assert await b.results().store(done(d)[0]) is True
        assert await b.claim(["fq"], LEASE, 3, 1, "w2") == []
        assert await b.queue().get_task(t.id) is None  # acked, not run again
        assert kinds(await b.events().get(t.id)) == [("enqueued", 0), ("started", 1)]

    backend_h.run(body)


def test_finish_stores_result_event_and_ack(backend_h: Harness) -> None:
    async def body(b: Any) -> None:
        t = task()
        await b.submit(t, enqueued(t))
        (d,) = await b.claim(["fq"], LEASE, 0, 1, "w1")
        result, event = done(d)
        assert await b.finish(d, result, event, failed=False) is True
        assert await b.results().get(t.id) == result
        assert kinds(await b.events().get(t.id)) == [
            ("enqueued", 0), ("started", 1), ("completed", 1)
        ]
        assert await b.queue().get_task(t.id) is None
        # Sent again (its reply was lost): the same outcome, one event.
        assert await b.finish(d, result, event, failed=False) is True
        assert len(await b.events().get(t.id)) == 3

    backend_h.run(body)


def test_a_late_finish_loses_and_writes_nothing(backend_h: Harness) -> None:
    async def body(b: Any) -> None:
        t = task(max_retries=1)
        await b.submit(t, enqueued(t))
        (stalled,) = await b.claim(["fq"], 0.5, 0, 1, "stalled")
        (taker,) = await b.claim(["fq"], LEASE, 8, 1, "taker")
        assert taker.attempt == 2
        result, event = done(taker, "taker")
        assert await b.finish(taker, result, event, failed=False) is True
        late, late_event = done(stalled, "stalled", value="late")
        assert await b.finish(stalled, late, late_event, failed=False) is False
        assert await b.results().get(t.id) == result
        assert kinds(await b.events().get(t.id)) == [
            ("enqueued", 0), ("started", 1), ("started", 2), ("completed", 2)
        ]

    backend_h.run(body)


def test_a_failed_finish_keeps_a_dead_letter(backend_h: Harness) -> None:
    async def body(b: Any) -> None:
        t = task()
        await b.submit(t, enqueued(t))
        (d,) = await b.claim(["fq"], LEASE, 0, 1, "w1")
        result = TaskResult(t.id, TaskStatus.FAILED, error_type="E", attempts=1, queue="fq")
        event = TaskEvent(t.id, EventType.FAILED, attempt=1, queue="fq")
        assert await b.finish(d, result, event, failed=True) is True
        stats = {s.queue: s for s in await b.queue().stats()}
        assert (stats["fq"].failed, stats["fq"].running) == (1, 0)

    backend_h.run(body)
