"""Redis behind a lossy network (tests/faultproxy.py), issue 8 item 10, and the fused
operations of issue 10.

A request lost on its way, a reply lost on its way back, a reply later than the client's
timeout: the client reports the failure (redis-py re-sends nothing on its own), and the
caller's retry of the same call has one effect. Aimed at a claim, a result store, an
event append, an ack, a retry, a release (issue 11) and a forget (issue 11), the fused
submit, claim and finish; then a chaos run of a real worker over 200 tasks, on one
Backend (fused) and on three (generic).
The shared Redis is used behind the proxy, under a prefix of each test's own.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from omniq.backends.redis import (
    _SHAS,
    _SOURCES,
    RedisEventStorage,
    RedisQueue,
    RedisResultStorage,
)
from omniq.errors import BackendUnavailable
from omniq.models import EventType, Task, TaskEvent, TaskResult, TaskStatus, seconds_from_now
from omniq.worker import Worker, WorkerSettings
from tests.faultproxy import FaultProxy
from tests.servers import LOCALHOST, drop_namespace, require, shared_unavailable

PORT = 6379
TIMEOUT = 1.0  # the proxied stores' reply timeout (socket_timeout)
KINDS = ("lose_request", "lose_reply", "delay_reply")
OUTCOMES = {EventType.COMPLETED, EventType.FAILED, EventType.TIMEOUT, EventType.EXPIRED,
            EventType.CANCELLED}
Stores = dict[str, Any]


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    require(shared_unavailable("redis"), "the shared Redis")
    with FaultProxy(LOCALHOST, PORT) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def prefix() -> Iterator[str]:
    name = "rf" + uuid.uuid4().hex[:10]
    yield name
    drop_namespace("redis", name)


def run(
    proxy: FaultProxy,
    prefix: str,
    body: Callable[[Stores], Awaitable[None]],
    limit: float = 60,
    *,
    fused: bool = True,
) -> None:
    """Run `body` with stores through the proxy (q, r, e) and straight to Redis (dq, dr,
    de). The proxied stores share one Backend (its fused operations: s["q"].backend),
    unless `fused` is False: then each is on a Backend of its own (the generic path)."""

    def opts(role: str) -> dict[str, Any]:
        return {"socket_timeout": TIMEOUT, **({} if fused else {"client_name": role})}

    async def main() -> None:
        stores: Stores = {
            "q": RedisQueue(host=LOCALHOST, port=proxy.port, prefix=prefix,
                            options=opts("q")),
            "r": RedisResultStorage(host=LOCALHOST, port=proxy.port, prefix=prefix,
                                    options=opts("r")),
            "e": RedisEventStorage(host=LOCALHOST, port=proxy.port, prefix=prefix,
                                   options=opts("e")),
            "dq": RedisQueue(host=LOCALHOST, port=PORT, prefix=prefix),
            "dr": RedisResultStorage(host=LOCALHOST, port=PORT, prefix=prefix),
            "de": RedisEventStorage(host=LOCALHOST, port=PORT, prefix=prefix),
        }
        for store in stores.values():
            await store.open()
        # Scripts loaded beforehand: a fault hits the script call, not a reload.
        for source in _SOURCES.values():
            await stores["dq"]._conn.call("SCRIPT", "LOAD", source)
        try:
            await asyncio.wait_for(body(stores), limit)
        finally:
            for store in stores.values():
                await store.close()

    asyncio.run(main())


def aim(proxy: FaultProxy, kind: str, script: str) -> None:
    """The next call of `script` through the proxy meets a fault of `kind`."""
    match = _SHAS[script].encode()
    if kind == "lose_request":
        proxy.lose_request(match=match)
    elif kind == "lose_reply":
        proxy.lose_reply(match=match)
    else:
        proxy.delay_reply(TIMEOUT + 1.0, match=match)


async def fails(call: Awaitable[Any]) -> None:
    """The client reports the fault: nothing is silently sent again."""
    with pytest.raises(BackendUnavailable):
        await call


def task(**kw: Any) -> Task:
    return Task(func="omniq.examples:add", args=(1, 2), **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_a_claim_without_reply_is_delivered_by_the_next_call(
    proxy: FaultProxy, prefix: str, kind: str
) -> None:
    async def body(s: Stores) -> None:
        t = task()
        await s["dq"].enqueue(t)
        aim(proxy, kind, "claim")
        await fails(s["q"].dequeue(["default"], 30, 0))
        assert proxy.pending == 0
        # The worker asks again: the lease taken for the lost reply is found, not stranded.
        d = await s["q"].dequeue(["default"], 30, 0)
        assert d is not None and d.task == t and d.attempt == 1
        assert await s["dq"].dequeue(["default"], 30, 0) is None
        (stats,) = await s["dq"].stats()
        assert (stats.queued, stats.running) == (0, 1)
        assert await s["q"].ack(d) is True
        assert await s["dq"].stats() == []

    run(proxy, prefix, body, limit=100)


def test_a_claim_found_again_whose_reply_is_lost_too_is_found_again(
    proxy: FaultProxy, prefix: str
) -> None:
    async def body(s: Stores) -> None:
        t = task()
        await s["dq"].enqueue(t)
        proxy.lose_reply(match=_SHAS["claim"].encode(), times=2)
        await fails(s["q"].dequeue(["default"], 30, 0))  # the claim
        await fails(s["q"].dequeue(["default"], 30, 0))  # the call that found it again
        d = await s["q"].dequeue(["default"], 30, 0)
        assert d is not None and d.task == t and d.attempt == 1
        assert await s["q"].ack(d) is True

    run(proxy, prefix, body)


def test_concurrent_calls_deliver_a_lost_claim_once(proxy: FaultProxy, prefix: str) -> None:
    async def body(s: Stores) -> None:
        tasks = [task() for _ in range(3)]
        for t in tasks:
            await s["dq"].enqueue(t)
        # Three claims in one pipelined request: all three replies are lost.
        proxy.lose_reply(match=_SHAS["claim"].encode())
        calls = [s["q"].dequeue(["default"], 30, 0) for _ in range(3)]
        got = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(g, BackendUnavailable) for g in got), got
        again = await asyncio.gather(*(s["q"].dequeue(["default"], 30, 0) for _ in range(5)))
        delivered = [d for d in again if d is not None]
        assert sorted(d.task.id for d in delivered) == sorted(t.id for t in tasks)
        assert {d.attempt for d in delivered} == {1}

    run(proxy, prefix, body)


@pytest.mark.parametrize("kind", KINDS)
def test_a_result_store_without_reply_stores_one_outcome(
    proxy: FaultProxy, prefix: str, kind: str
) -> None:
    async def body(s: Stores) -> None:
        result = TaskResult(task_id=str(uuid.uuid4()), status=TaskStatus.COMPLETED, value=3,
                            worker_id="w1", expires_at=seconds_from_now(600))
        aim(proxy, kind, "result_store")
        await fails(s["r"].store(result))
        # Sent again: it is this same outcome (stored by the lost call or by this one).
        assert await s["r"].store(result) is True
        assert await s["dr"].get(result.task_id) == result
        late = TaskResult(task_id=result.task_id, status=TaskStatus.COMPLETED, value=4,
                          worker_id="w2")
        assert await s["dr"].store(late) is False
        assert await s["dr"].get(result.task_id) == result

    run(proxy, prefix, body)


@pytest.mark.parametrize("kind", KINDS)
def test_an_event_append_without_reply_is_stored_once(
    proxy: FaultProxy, prefix: str, kind: str
) -> None:
    async def body(s: Stores) -> None:
        tid = str(uuid.uuid4())
        first = TaskEvent(task_id=tid, event_type=EventType.ENQUEUED)
        started = TaskEvent(task_id=tid, event_type=EventType.STARTED, attempt=1)
        await s["e"].append(first)
        aim(proxy, kind, "events_append")
        await fails(s["e"].append_many([started]))
        await s["e"].append_many([started])  # the worker's retry of the same batch
        assert await s["de"].get(tid) == [first, started]
        rows = [e for _, e in await s["de"].read(None, 100) if e.task_id == tid]
        assert rows == [first, started]

    run(proxy, prefix, body)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("failed", [False, True], ids=["done", "dead-letter"])
def test_an_ack_without_reply_settles_once(
    proxy: FaultProxy, prefix: str, kind: str, failed: bool
) -> None:
    async def body(s: Stores) -> None:
        t = task(unique_key="k-" + kind)
        await s["dq"].enqueue(t)
        d = await s["q"].dequeue(["default"], 30, 0)
        assert d is not None
        aim(proxy, kind, "ack")
        await fails(s["q"].ack(d, failed=failed))
        again = await s["q"].ack(d, failed=failed)
        # A dead letter keeps the token that made it one: the repeat finds its own
        # work done. A finished task is gone: the repeat can only say "not held".
        assert again is (failed or kind == "lose_request")
        stats = await s["dq"].stats()
        assert [(x.queued, x.running, x.failed) for x in stats] == ([(0, 0, 1)] if failed else [])
        fresh = task(unique_key="k-" + kind)
        assert await s["dq"].enqueue(fresh) == fresh.id  # the key was freed once

    run(proxy, prefix, body)


@pytest.mark.parametrize("kind", KINDS)
def test_a_retry_without_reply_queues_the_task_once(
    proxy: FaultProxy, prefix: str, kind: str
) -> None:
    async def body(s: Stores) -> None:
        t = task()
        await s["dq"].enqueue(t)
        d = await s["q"].dequeue(["default"], 30, 0)
        assert d is not None
        aim(proxy, kind, "retry")
        await fails(s["q"].retry(d, 0))
        assert await s["q"].retry(d, 0) is True
        again = await s["dq"].dequeue(["default"], 30, 0)
        assert again is not None and again.task == t and again.attempt == 2
        assert await s["dq"].dequeue(["default"], 30, 0) is None
        assert await s["q"].retry(d, 0) is False  # its lease is over: no effect
        assert await s["dq"].ack(again) is True

    run(proxy, prefix, body)


@pytest.mark.parametrize("kind", KINDS)
def test_a_release_without_reply_hands_the_task_back_once(
    proxy: FaultProxy, prefix: str, kind: str
) -> None:
    async def body(s: Stores) -> None:
        t = task()
        await s["dq"].enqueue(t)
        d = await s["q"].dequeue(["default"], 30, 0)
        assert d is not None
        aim(proxy, kind, "release")
        await fails(s["q"].release(d, 0.3))
        await s["q"].release(d, 0.3)  # the worker's retry: the attempt is given back once
        again = await s["dq"].dequeue(["default"], 30, 5)
        assert again is not None and again.task == t and again.attempt == 1
        assert await s["dq"].dequeue(["default"], 30, 0) is None
        assert await s["dq"].ack(again) is True

    run(proxy, prefix, body)


@pytest.mark.parametrize("kind", KINDS)
def test_a_forget_without_reply_deletes_once(proxy: FaultProxy, prefix: str, kind: str) -> None:
    async def body(s: Stores) -> None:
        t = task(unique_key="f-" + kind)
        await s["dq"].enqueue(t)
        d = await s["dq"].dequeue(["default"], 30, 0)
        assert d is not None and await s["dq"].ack(d, failed=True) is True
        aim(proxy, kind, "forget")
        await fails(s["q"].forget([t.id]))
        assert await s["q"].forget([t.id]) == (1 if kind == "lose_request" else 0)
        assert await s["dq"].failed() == [] and await s["dq"].get_task(t.id) is None
        fresh = task(unique_key="f-" + kind)
        assert await s["dq"].enqueue(fresh) == fresh.id  # the key was freed

    run(proxy, prefix, body)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fused_submit_without_reply_stores_one_task_and_event(
    proxy: FaultProxy, prefix: str, kind: str
) -> None:
    async def body(s: Stores) -> None:
        b = s["q"].backend
        t = task()
        event = TaskEvent(task_id=t.id, event_type=EventType.ENQUEUED, queue=t.queue)
        aim(proxy, kind, "enqueue")
        await fails(b.submit(t, event))
        assert await b.submit(t, event) == t.id  # the client's retry of the same call
        assert await s["de"].get(t.id) == [event]
        assert [e for _, e in await s["de"].read(None, 100)] == [event]
        d = await s["dq"].dequeue(["default"], 30, 0)
        assert d is not None and d.task == t and d.attempt == 1
        assert await s["dq"].dequeue(["default"], 30, 0) is None

    run(proxy, prefix, body)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fused_claim_without_reply_is_delivered_by_the_next_call_with_one_started(
    proxy: FaultProxy, prefix: str, kind: str
) -> None:
    async def body(s: Stores) -> None:
        b = s["q"].backend
        tasks = [task() for _ in range(3)]
        for t in tasks:
            await s["dq"].enqueue(t)
        aim(proxy, kind, "claim")
        await fails(b.claim(["default"], 30, 0, 2, "w1"))
        got = await b.claim(["default"], 30, 0, 2, "w1")  # the lost batch, found again
        assert [d.task.id for d in got] == [t.id for t in tasks[:2]]
        assert {d.attempt for d in got} == {1} and len({d.receipt for d in got}) == 2
        rest = await b.claim(["default"], 30, 0, 2, "w1")
        assert [d.task.id for d in rest] == [tasks[2].id]
        for t in tasks:
            kinds = [e.event_type for e in await s["de"].get(t.id)]
            assert kinds == [EventType.STARTED], (t.id, kinds)
        for d in [*got, *rest]:
            assert await s["dq"].ack(d) is True

    run(proxy, prefix, body)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fused_finish_without_reply_settles_once(
    proxy: FaultProxy, prefix: str, kind: str
) -> None:
    async def body(s: Stores) -> None:
        b = s["q"].backend
        t = task()
        await s["dq"].enqueue(t)
        (d,) = await b.claim(["default"], 30, 0, 1, "w1")
        result = TaskResult(task_id=t.id, status=TaskStatus.COMPLETED, value=3,
                            worker_id="w1", attempts=1, expires_at=seconds_from_now(600))
        event = TaskEvent(task_id=t.id, event_type=EventType.COMPLETED, attempt=1)
        aim(proxy, kind, "finish")
        await fails(b.finish(d, result, event, failed=False))
        assert await b.finish(d, result, event, failed=False) is True  # sent again
        assert await s["dr"].get(t.id) == result
        kinds = [e.event_type for e in await s["de"].get(t.id)]
        assert kinds == [EventType.STARTED, EventType.COMPLETED]
        assert await s["dq"].stats() == [] and await s["dq"].get_task(t.id) is None
        late = TaskResult(task_id=t.id, status=TaskStatus.COMPLETED, value=4)
        assert await b.finish(d, late, event, failed=False) is False

    run(proxy, prefix, body)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_chaos_worker_run_leaves_one_outcome_per_task(
    proxy: FaultProxy, prefix: str, fused: bool
) -> None:
    tasks = [Task(func="omniq.examples:add", args=(i, 1)) for i in range(200)]
    # Each write of a task's life loses a reply at least once, the rest at random.
    aimed = ("claim", "finish") if fused else ("claim", "result_store", "events_append", "ack")

    async def body(s: Stores) -> None:
        for t in tasks:
            await s["dq"].enqueue(t)
        await s["de"].append_many(
            [TaskEvent(task_id=t.id, event_type=EventType.ENQUEUED, queue=t.queue)
             for t in tasks]
        )
        for script in aimed:
            for kind in KINDS:
                aim(proxy, kind, script)
        proxy.chaos(0.06, kinds=KINDS, delay=TIMEOUT + 0.5)
        settings = WorkerSettings(concurrency=8, burst=True, lease=30, poll_interval=0.2)
        worker = Worker(s["q"], s["r"], s["e"], settings)
        await asyncio.wait_for(worker.run(), 80)
        proxy.calm()
        # The aimed faults all happened, and some at random besides.
        assert proxy.pending == 0, proxy.injected
        assert sum(proxy.injected.values()) > len(aimed) * len(KINDS), proxy.injected
        for t in tasks:
            result = await s["dr"].get(t.id)
            assert result is not None and result.value == t.args[0] + 1, t.id
            events = await s["de"].get(t.id)
            ids = [e.id for e in events]
            assert len(ids) == len(set(ids)), events
            kinds = [e.event_type for e in events]
            assert sum(k in OUTCOMES for k in kinds) == 1, kinds
            started = collections.Counter(e.attempt for e in events
                                          if e.event_type == EventType.STARTED)
            assert started and max(started.values()) == 1, kinds
        assert await s["dq"].stats() == []

    run(proxy, prefix, body, limit=100, fused=fused)
