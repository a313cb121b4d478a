"""Redis behaviour of issue 11's store methods beyond the conformance suite: no STARTED
claimed for a task that waits for others, dead letters paged by the stored millisecond
across queues (ties, stale index entries, undecodable payloads), forget, records and
get_many in one round trip, stores written before issue 11, and the features through
a worker on one Backend."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis

from omniq import OmniQ
from omniq.backends.redis import RedisBackend, RedisQueue, RedisResultStorage, RedisSettings
from omniq.backends.redis.base import from_ms
from omniq.config import OmniQConfig
from omniq.errors import TaskFailed
from omniq.models import (
    EventType,
    Task,
    TaskResult,
    TaskStatus,
    new_task_id,
    seconds_from_now,
    utcnow,
)
from omniq.serialization import UNDECODABLE_FUNC, encode_task
from tests.servers import drop_namespace, require, shared_unavailable

from .tech_redis import HOST, PORT

US = timedelta(microseconds=1)


@pytest.fixture
def prefix() -> Iterator[str]:
    require(shared_unavailable("redis"), "the shared Redis")
    name = "ro" + uuid.uuid4().hex[:10]
    yield name
    drop_namespace("redis", name)


@pytest.fixture
def admin() -> Iterator[redis.Redis]:
    client = redis.Redis(host=HOST, port=PORT, socket_timeout=5)
    yield client
    client.close()


def run(body: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout))


def task(queue: str = "default", **kw: Any) -> Task:
    return Task(func="omniq.examples:add", args=(1, 2), queue=queue, **kw)


async def dead_letter(q: Any, queue: str, **kw: Any) -> Task:
    t = task(queue, **kw)
    await q.enqueue(t)
    d = await q.dequeue([queue], 30, 0)
    assert d is not None and d.task.id == t.id
    assert await q.ack(d, failed=True) is True
    return t


def round_trips(store: Any) -> list[int]:
    """The sizes of the requests the store's connection sends from now on."""
    batcher = store._conn.link().batcher
    sent: list[int] = []
    send = batcher._send

    async def counting(commands: list[Any]) -> list[Any]:
        sent.append(len(commands))
        return await send(commands)

    batcher._send = counting
    return sent


# --- a task that waits for others ---------------------------------------------------------


def test_a_claim_stores_no_started_for_a_task_that_waits_for_others(
    prefix: str, admin: redis.Redis
) -> None:
    async def body() -> None:
        b = RedisBackend(RedisSettings(host=HOST, port=PORT, prefix=prefix))
        q, e = b.queue(), b.events()
        async with q, e:
            plain, waits = task("dep"), task("dep", after=(new_task_id(),))
            for t in (plain, waits):
                await q.enqueue(t)
            assert admin.hget(f"{prefix}:t:{plain.id}", "af") is None  # as before issue 11
            assert admin.hget(f"{prefix}:t:{waits.id}", "af") == b"1"
            got = {d.task.id: d for d in await b.claim(["dep"], 30, 0, 5, "w1")}
            assert [x.event_type for x in await e.get(plain.id)] == [EventType.STARTED]
            assert await e.get(waits.id) == []
            await q.release(got[waits.id], 0.3)
            (stats,) = await q.stats()
            assert (stats.scheduled, stats.running) == (1, 1)
            (again,) = await b.claim(["dep"], 30, 5, 1, "w1")
            assert again.task.id == waits.id and again.attempt == 1
            assert await e.get(waits.id) == []

    run(body)


def _config(prefix: str) -> OmniQConfig:
    where = {f"{role}_{key}": value for role in ("task_queue", "result_storage",
                                                 "event_storage")
             for key, value in (("type", "redis"), ("host", HOST), ("port", PORT),
                                ("prefix", prefix))}
    return OmniQConfig.from_values(default_retry_delay=0.01,
                                   worker_queues=["default", "mail"], **where)


def _kinds(client: OmniQ, task_id: str) -> list[str]:
    return [e.event_type.value for e in client.get_events(task_id)]


def test_dependencies_and_failed_tasks_through_a_worker(prefix: str) -> None:
    """On one Backend (the fused claim and finish): a dependent task's one STARTED is
    the worker's; then the failed tasks in bulk."""
    with OmniQ(_config(prefix), embedded_worker="shared") as omniq:
        first = omniq.enqueue("omniq.examples:sleep", 0.3, "first")
        then = omniq.options(after=[first]).enqueue("omniq.examples:echo", "second")
        assert omniq.get_result(then, timeout=10) == {"args": ["second"], "kwargs": {}}
        assert _kinds(omniq, then) == ["enqueued", "started", "completed"]
        bad = omniq.enqueue("omniq.examples:fail", "boom")
        dependent = omniq.options(after=[bad]).enqueue("omniq.examples:add", 1, 1)
        with pytest.raises(TaskFailed, match="dependency failed"):
            omniq.get_result(dependent, timeout=10)
        assert _kinds(omniq, dependent) == ["enqueued", "failed"]
        mail = omniq.options(queue="mail").enqueue("omniq.examples:fail", "mail")
        with pytest.raises(TaskFailed):
            omniq.get_result(mail, timeout=10)
        assert [f.task.id for f in omniq.failed()] == [mail, dependent, bad]
        assert omniq.failed(queue="mail")[0].error == "RuntimeError: mail"
        assert omniq.retry_failed(queue="default", func="fail") == [bad]
        with pytest.raises(TaskFailed):
            omniq.get_result(bad, timeout=10)  # ran again, failed again
        assert omniq.purge_failed(queue="mail") == [mail]
        assert {f.task.id for f in omniq.failed()} == {bad, dependent}


# --- failed() -----------------------------------------------------------------------------


def test_failed_pages_by_the_stored_millisecond_across_queues(
    prefix: str, admin: redis.Redis
) -> None:
    async def body() -> None:
        async with RedisQueue(host=HOST, port=PORT, prefix=prefix) as q:
            a, b, c, d = [await dead_letter(q, name) for name in ("f1", "f2", "f1", "f2")]
            # Failure times of our choosing: two dead letters of two queues share one ms.
            for t, at in ((a, 1_000), (b, 2_000), (c, 2_000), (d, 3_000)):
                admin.zadd(f"{prefix}:q:{t.queue}:failed", {t.id: at})
            every = await q.failed()
            tied = sorted((b.id, c.id), reverse=True)  # a tie: the newer id first
            assert [f.task.id for f in every] == [d.id, *tied, a.id]
            assert [f.failed_at for f in every] == [from_ms(t) for t in (3000, 2000, 2000, 1000)]
            # A page does not end inside a millisecond: the tie comes whole.
            assert [f.task.id for f in await q.failed(limit=2)] == [d.id, *tied]
            assert [f.task.id for f in await q.failed(limit=3)] == [d.id, *tied]
            assert [f.task.id for f in await q.failed(limit=1)] == [d.id]
            assert [f.task.id for f in await q.failed(before=every[1].failed_at)] == [a.id]
            assert [f.task.id for f in await q.failed(before=every[1].failed_at + US)] == [
                *tied, a.id]
            assert len(await q.failed(since=every[1].failed_at)) == 3  # inclusive
            assert len(await q.failed(since=every[1].failed_at - US)) == 3
            assert len(await q.failed(since=every[1].failed_at + US)) == 1
            assert [f.task.id for f in await q.failed("f1")] == [c.id, a.id]
            assert await q.failed(limit=0) == [] and await q.failed("nowhere") == []

    run(body)


def test_failed_drops_stale_index_entries_and_reads_undecodable_ones(
    prefix: str, admin: redis.Redis
) -> None:
    async def body() -> None:
        async with RedisQueue(host=HOST, port=PORT, prefix=prefix) as q:
            old, newer = await dead_letter(q, "st"), await dead_letter(q, "st")
            admin.zadd(f"{prefix}:q:st:failed", {new_task_id(): 10**13})  # no record
            admin.hset(f"{prefix}:t:{newer.id}", "d", b"\xff not a task")
            page = await q.failed("st", limit=2)
            assert [f.task.id for f in page] == [newer.id, old.id]  # still a full page
            assert page[0].task.func == UNDECODABLE_FUNC and page[0].task.queue == "st"
            assert admin.zcard(f"{prefix}:q:st:failed") == 2  # the stale entry went

    run(body)


def test_a_burst_of_failures_in_one_millisecond_pages_without_a_gap(
    prefix: str, admin: redis.Redis
) -> None:
    async def body() -> None:
        async with RedisQueue(host=HOST, port=PORT, prefix=prefix) as q:
            dead = [await dead_letter(q, name) for name in ("b1", "b2") * 6]
            for i, t in enumerate(dead):  # 1 at 9000, 10 at 8000, 1 at 7000
                at = 9000 if i == 0 else 7000 if i == 11 else 8000
                admin.zadd(f"{prefix}:q:{t.queue}:failed", {t.id: at})
            seen, before, pages = [], None, 0
            while True:
                page = await q.failed(None, None, before, 4)
                pages += 1
                seen += [f.task.id for f in page]
                if len(page) < 4:
                    break
                before = page[-1].failed_at
            assert sorted(seen) == sorted(t.id for t in dead) and len(seen) == 12
            assert pages == 2  # 11 (the group of 10 whole), then 1

    run(body)


# --- forget, records, get_many ---------------------------------------------------------------


def test_forget_frees_the_key_keeps_the_events_and_counts_once(
    prefix: str, admin: redis.Redis
) -> None:
    async def body() -> None:
        b = RedisBackend(RedisSettings(host=HOST, port=PORT, prefix=prefix,
                                       options={"event_ttl": 3600}))
        q, e = b.queue(), b.events()
        async with q, e:
            dead = await dead_letter(q, "fg", unique_key="nightly")
            many = [await dead_letter(q, "fg") for _ in range(3)]
            sent = round_trips(q)
            ids = [dead.id, *(t.id for t in many)]
            unknown = [new_task_id() for _ in range(1000)]
            # 1004 distinct ids (a repeat counts once): three script calls, one request.
            assert await q.forget([*ids, *unknown, *ids]) == 4 and sent == [3]
            assert await q.forget([dead.id]) == 0  # sent again: nothing twice
            assert await q.failed("fg") == [] and await q.stats() == []
            assert not admin.exists(f"{prefix}:u:nightly")
            assert 3_500_000 < admin.pttl(f"{prefix}:t:{dead.id}") <= 3_600_000
            fresh = task("fg", unique_key="nightly")
            assert await q.enqueue(fresh) == fresh.id

    run(body)


def test_records_live_in_one_hash_per_kind(prefix: str, admin: redis.Redis) -> None:
    async def body() -> None:
        async with RedisQueue(host=HOST, port=PORT, prefix=prefix) as q:
            await q.put_record("cancel", "t1", b"{}")
            await q.put_record("cancel", "t2", b"[]")
            assert admin.hgetall(f"{prefix}:rec:cancel") == {b"t1": b"{}", b"t2": b"[]"}
            sent = round_trips(q)
            assert await q.list_records("cancel") == [("t1", b"{}"), ("t2", b"[]")]
            assert sent == [1]
            # Names that could never be stored are never found (nothing is asked).
            assert await q.get_record("cancel", "a b") is None
            assert await q.list_records("no spaces") == []
            assert await q.delete_record("{tag}", "t1") is False and sent == [1]
            with pytest.raises(ValueError):
                await q.put_record("cancel", "", b"")

    run(body)


def test_get_many_is_one_round_trip_for_many(prefix: str) -> None:
    async def body() -> None:
        async with RedisResultStorage(host=HOST, port=PORT, prefix=prefix) as r:
            results = [TaskResult(new_task_id(), TaskStatus.COMPLETED, value=i,
                                  expires_at=seconds_from_now(60)) for i in range(3)]
            gone = TaskResult(new_task_id(), TaskStatus.COMPLETED,
                              expires_at=utcnow() - timedelta(seconds=1))
            for result in (*results, gone):
                await r.store(result)
            ids = [new_task_id() for _ in range(1200)] + [x.task_id for x in results]
            sent = round_trips(r)
            got = await r.get_many([*ids, gone.task_id, results[0].task_id])
            assert got == {x.task_id: x for x in results}
            assert sent == [3]  # 1204 distinct keys: three MGETs in one request

    run(body)


# --- a store written before issue 11 ---------------------------------------------------------


def test_a_store_written_before_issue_11_keeps_working(prefix: str, admin: redis.Redis) -> None:
    """Issue 10's records: no "af" field, dead letters only in their queue's index. They
    are claimed with STARTED as before, listed, forgotten; records start empty."""
    waiting, dead = task("old"), task("old")
    for t, state in ((waiting, "w"), (dead, "f")):
        admin.hset(f"{prefix}:t:{t.id}", mapping={
            "d": encode_task(t), "q": "old", "p": 0, "mr": 0, "x": "", "u": "", "ut": 0,
            "s": state, "a": 1 if state == "f" else 0, "t": "tok" if state == "f" else ""})
    admin.sadd(f"{prefix}:queues", "old")
    admin.set(f"{prefix}:layout", "2")
    admin.zadd(f"{prefix}:q:old", {waiting.id: -(10**15)})
    failed_ms = int(utcnow().timestamp() * 1000) - 5000
    admin.zadd(f"{prefix}:q:old:failed", {dead.id: failed_ms})

    async def body() -> None:
        b = RedisBackend(RedisSettings(host=HOST, port=PORT, prefix=prefix))
        q, e = b.queue(), b.events()
        async with q, e:
            (d,) = await b.claim(["old"], 30, 0, 5, "w1")
            assert d.task == waiting
            assert [x.event_type for x in await e.get(waiting.id)] == [EventType.STARTED]
            (listed,) = await q.failed()
            assert listed.task == dead and listed.failed_at == from_ms(failed_ms)
            assert await q.forget([dead.id]) == 1 and await q.failed() == []
            assert await q.list_records("schedule") == []

    run(body)
