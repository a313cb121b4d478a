"""NATS over a lossy network (issue 8, item 10): a write whose request or reply is lost, or
whose reply comes after the client gave up, is safe to send again, and a claim whose
reply was lost does not strand its task.

The stores talk to the shared nats-server through the fault proxy (tests/faultproxy.py),
each test under a prefix of its own. A lost request or reply drops the proxied
connection; nats-py then reconnects and the call that waited for the reply raises
BackendUnavailable after the stores' request timeout (short here: TIMEOUT).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from omniq.errors import BackendUnavailable
from omniq.models import EventType, Task, TaskEvent, TaskResult, TaskStatus
from omniq.worker import Worker, WorkerSettings
from tests.faultproxy import FaultProxy
from tests.servers import SHARED_NATS, drop_namespace, require, shared_unavailable

nats_backend = pytest.importorskip("omniq.backends.nats", reason="nats-py is not installed")

TIMEOUT = 1.0  # the stores' request timeout: a reply later than this counts as lost
FAULTS = ("lose_request", "lose_reply", "delay_reply")
OUTCOMES = {EventType.COMPLETED, EventType.FAILED, EventType.TIMEOUT, EventType.EXPIRED}
T = TypeVar("T")


@dataclass
class Net:
    proxy: FaultProxy
    prefix: str

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.proxy.port}"

    def store(self, cls: type[T]) -> T:
        """A store that reaches the server through the proxy."""
        return cls(self.url, prefix=self.prefix, request_timeout=TIMEOUT)  # type: ignore[call-arg]

    def direct(self, cls: type[T]) -> T:
        """A store on the same data that bypasses the proxy (for setting up and checking)."""
        return cls(SHARED_NATS, prefix=self.prefix)  # type: ignore[call-arg]

    async def backend(self) -> Any:
        """A Backend through the proxy, its three stores open (for the fused operations)."""
        settings = nats_backend.NATSSettings(servers=[self.url], prefix=self.prefix,
                                             request_timeout=TIMEOUT)
        backend = nats_backend.backend_for(settings)
        for store in _stores(backend):
            await _eventually(store.open)
        return backend

    def inject(self, kind: str, match: bytes) -> None:
        if kind == "lose_request":
            self.proxy.lose_request(match=match)
        elif kind == "lose_reply":
            self.proxy.lose_reply(match=match)
        else:
            self.proxy.delay_reply(TIMEOUT * 2.5, match=match)


@pytest.fixture
def net() -> Iterator[Net]:
    require(shared_unavailable("nats"), "NATS")
    prefix = "fx_" + uuid.uuid4().hex[:10]
    with FaultProxy("127.0.0.1", 4222) as proxy:
        yield Net(proxy, prefix)
    drop_namespace("nats", prefix, SHARED_NATS)


async def _eventually(fn: Callable[[], Awaitable[T]], within: float = 30.0) -> T:
    """`fn()`, called again while the connection is being re-established."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await fn()
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def _task(**kw: Any) -> Task:
    return Task(func="omniq.examples:add", args=(1, 2), **kw)


async def _close(*stores: Any) -> None:
    for store in stores:
        await store.close()


def _stores(backend: Any) -> list[Any]:
    return [backend.queue(), backend.results(), backend.events()]


def _enqueued(t: Task) -> TaskEvent:
    return TaskEvent(t.id, EventType.ENQUEUED, queue=t.queue)


def _kinds(events: list[TaskEvent]) -> list[tuple[str, int]]:
    return [(e.event_type.value, e.attempt) for e in events]


# --- one fault aimed at one write ------------------------------------------------------


@pytest.mark.parametrize("kind", FAULTS)
def test_a_claim_whose_reply_never_came_is_delivered_by_the_next_dequeue(
    net: Net, kind: str
) -> None:
    async def body() -> None:
        q = net.store(nats_backend.NATSQueue)
        t = _task()
        await q.enqueue(t)
        net.inject(kind, b"Omniq-State: running")
        with pytest.raises(BackendUnavailable):
            await q.dequeue(["default"], 30, 2)
        assert net.proxy.injected[kind] == 1
        # Taken (lost reply / late reply) or not (lost request): either way it is
        # delivered now, once, as its first attempt, not after its lease ran out.
        d = await _eventually(lambda: q.dequeue(["default"], 30, 5))
        assert d is not None and d.task == t and d.attempt == 1
        assert await q.dequeue(["default"], 30, 0) is None
        assert await q.ack(d) is True
        assert await q.get_task(t.id) is None and await q.stats() == []
        await q.close()

    asyncio.run(body())


@pytest.mark.parametrize("kind", ["lose_reply", "delay_reply"])
def test_a_store_closed_after_a_lost_claim_hands_the_task_back(net: Net, kind: str) -> None:
    async def body() -> None:
        q = net.store(nats_backend.NATSQueue)
        t = _task()
        await q.enqueue(t)
        net.inject(kind, b"Omniq-State: running")
        with pytest.raises(BackendUnavailable):
            await q.dequeue(["default"], 30, 2)
        deadline = time.monotonic() + 10
        while not q._conn.nc.is_connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(TIMEOUT * 2)  # the late reply (if any) has come and gone
        await q.close()  # the worker stops: the claim it never saw is handed back
        other = net.direct(nats_backend.NATSQueue)
        began = time.monotonic()
        d = await other.dequeue(["default"], 30, 20)
        assert d is not None and d.task == t and d.attempt == 1
        assert time.monotonic() - began < 10  # not after the 30 s lease
        assert await other.ack(d) is True
        await other.close()

    asyncio.run(body())


@pytest.mark.parametrize("kind", FAULTS)
def test_a_result_sent_again_is_stored_once_and_still_wins(net: Net, kind: str) -> None:
    async def body() -> None:
        results = net.store(nats_backend.NATSResultStorage)
        await results.open()  # the bucket exists: the fault hits the write itself
        tid = _task().id
        mine = TaskResult(tid, TaskStatus.COMPLETED, value=3, worker_id="w1")
        net.inject(kind, f"$KV.{net.prefix}_results.".encode())
        with pytest.raises(BackendUnavailable):
            await results.store(mine)
        # The worker sends it again: this result is the stored one, so the call reports
        # it stored (a False would make the worker drop its outcome event).
        assert await _eventually(lambda: results.store(mine)) is True
        late = TaskResult(tid, TaskStatus.COMPLETED, value=4, worker_id="w2")
        assert await results.store(late) is False
        got = await results.get(tid)
        assert got is not None and (got.value, got.worker_id) == (3, "w1")
        await results.close()

    asyncio.run(body())


@pytest.mark.parametrize("kind", FAULTS)
def test_an_event_sent_again_is_stored_once(net: Net, kind: str) -> None:
    async def body() -> None:
        events = net.store(nats_backend.NATSEventStorage)
        await events.open()
        tid = _task().id
        first = TaskEvent(tid, EventType.ENQUEUED)
        second = TaskEvent(tid, EventType.STARTED, attempt=1)
        subject = f"{net.prefix}.events.".encode()
        net.inject(kind, subject)
        with pytest.raises(BackendUnavailable):
            await events.append(first)
        await _eventually(lambda: events.append(first))
        net.inject(kind, subject)
        with pytest.raises(BackendUnavailable):
            await events.append_many([second])
        await _eventually(lambda: events.append_many([first, second]))
        got = await events.get(tid)
        assert [e.id for e in got] == [first.id, second.id]
        await events.close()

    asyncio.run(body())


def _settle_match(net: Net, op: str) -> bytes:
    if op == "ack":  # the fenced purge of the task's state
        return f"$JS.API.STREAM.PURGE.KV_{net.prefix}_queue".encode()
    state = {"ack-failed": "failed", "retry": "waiting", "extend": "running"}[op]
    return f"Omniq-State: {state}".encode()


async def _settle(q: Any, d: Any, op: str) -> bool:
    if op == "ack":
        return bool(await q.ack(d))
    if op == "ack-failed":
        return bool(await q.ack(d, failed=True))
    if op == "retry":
        return bool(await q.retry(d, 0.2))
    return bool(await q.extend(d, 30))


@pytest.mark.parametrize("kind", FAULTS)
@pytest.mark.parametrize("op", ["ack", "ack-failed", "retry", "extend"])
def test_a_settlement_sent_again_reports_that_it_was_done(
    net: Net, kind: str, op: str
) -> None:
    async def body() -> None:
        q = net.store(nats_backend.NATSQueue)
        t = _task(max_retries=3)
        await q.enqueue(t)
        d = await q.dequeue(["default"], 30, 5)
        assert d is not None
        net.inject(kind, _settle_match(net, op))
        with pytest.raises(BackendUnavailable):
            await _settle(q, d, op)
        assert await _eventually(lambda: _settle(q, d, op)) is True
        await _after_settle(q, t, d, op)
        await q.close()

    asyncio.run(body())


async def _after_settle(q: Any, t: Task, d: Any, op: str) -> None:
    stats = {s.queue: s for s in await q.stats()}
    if op == "ack":
        assert await q.get_task(t.id) is None and stats == {}
    elif op == "ack-failed":
        assert stats["default"].failed == 1
        assert await q.dequeue(["default"], 30, 0.5) is None
        # Its failure record went out with the state: stored once, listed once.
        assert [f.task for f in await q.failed()] == [t]
        assert (await _failed_records(q)) == 1
    elif op == "retry":
        again = await q.dequeue(["default"], 30, 5)
        assert again is not None and again.task == t and again.attempt == 2
        assert await q.ack(again) is True
    else:  # still held, and by us only
        assert stats["default"].running == 1
        assert await q.dequeue(["default"], 30, 0) is None
        assert await q.ack(d) is True


async def _failed_records(q: Any) -> int:
    return int((await q._conn.js.stream_info(f"{q.prefix}_failed")).state.messages)


@pytest.mark.parametrize("kind", FAULTS)
def test_a_release_with_a_delay_sent_again_hands_the_task_back_once(net: Net, kind: str) -> None:
    async def body() -> None:
        q = net.store(nats_backend.NATSQueue)
        t = _task()
        await q.enqueue(t)
        d = await q.dequeue(["default"], 30, 5)
        assert d is not None
        net.inject(kind, b"Omniq-State: waiting")
        began = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await q.release(d, 4.0)  # longer than a late reply takes (2.5 s)
        await _eventually(lambda: q.release(d, 4.0))
        (stats,) = await q.stats()
        assert (stats.scheduled, stats.running) == (1, 0)
        again = await q.dequeue(["default"], 30, 10)
        assert again is not None and again.task == t and again.attempt == 1
        assert time.monotonic() - began > 3.5  # released once, by whichever write landed
        assert await q.dequeue(["default"], 30, 0) is None
        assert await q.ack(again) is True
        await q.close()

    asyncio.run(body())


@pytest.mark.parametrize("kind", FAULTS)
@pytest.mark.parametrize("step", ["state", "records"])
def test_a_forget_sent_again_leaves_nothing_behind(net: Net, kind: str, step: str) -> None:
    async def body() -> None:
        q = net.store(nats_backend.NATSQueue)
        t = _task(unique_key="nightly")
        await q.enqueue(t)
        d = await q.dequeue(["default"], 30, 5)
        assert d is not None and await q.ack(d, failed=True) is True
        # The dead letter's fenced purge; or, once it is gone, its records' purge.
        where = f"KV_{net.prefix}_queue" if step == "state" else f"{net.prefix}_failed"
        net.inject(kind, f"$JS.API.STREAM.PURGE.{where}".encode())
        with pytest.raises(BackendUnavailable):
            await q.forget([t.id])
        assert await _eventually(lambda: q.forget([t.id])) in (0, 1)  # 0: it went the 1st time
        assert await q.get_task(t.id) is None and await q.failed() == []
        assert await q.stats() == []
        again = _task(unique_key="nightly")  # its unique key is free (or freed on use)
        assert await q.enqueue(again) == again.id
        await q.close()

    asyncio.run(body())


@pytest.mark.parametrize("kind", FAULTS)
def test_a_record_written_again_is_the_one_stored(net: Net, kind: str) -> None:
    async def body() -> None:
        q = net.store(nats_backend.NATSQueue)
        await q.open()
        net.inject(kind, f"$KV.{net.prefix}_records.".encode())
        with pytest.raises(BackendUnavailable):
            await q.put_record("cancel", "t1", b'{"kill": false}')
        await _eventually(lambda: q.put_record("cancel", "t1", b'{"kill": false}'))
        assert await q.list_records("cancel") == [("t1", b'{"kill": false}')]
        net.inject(kind, f"$JS.API.STREAM.INFO.KV_{net.prefix}_records".encode())
        with pytest.raises(BackendUnavailable):
            await q.list_records("cancel")
        assert await _eventually(lambda: q.list_records("cancel")) == [
            ("t1", b'{"kill": false}')]
        await q.close()

    asyncio.run(body())


@pytest.mark.parametrize("kind", FAULTS)
@pytest.mark.parametrize("step", ["state", "record"])
def test_a_fused_failure_sent_again_stores_one_dead_letter_and_one_record(
    net: Net, kind: str, step: str
) -> None:
    async def body() -> None:
        b = await net.backend()
        t = _task()
        await b.submit(t, _enqueued(t))
        (d,) = await b.claim(["default"], 30, 5, 1, "w1")
        result = TaskResult(t.id, TaskStatus.FAILED, error_type="RuntimeError", attempts=1)
        failed = TaskEvent(t.id, EventType.FAILED, attempt=1, worker_id="w1")
        # The record, the state's dead letter and the outcome event go out together.
        net.inject(kind, b"Omniq-State: failed" if step == "state"
                   else f"HPUB {net.prefix}.failed.".encode())
        with pytest.raises(BackendUnavailable):
            await b.finish(d, result, failed, failed=True)
        assert await _eventually(lambda: b.finish(d, result, failed, failed=True)) is True
        q = b.queue()
        assert [f.task for f in await q.failed()] == [t]
        assert await _failed_records(q) == 1
        assert _kinds(await b.events().get(t.id)) == [
            ("enqueued", 0), ("started", 1), ("failed", 1)
        ]
        await _close(*_stores(b))

    asyncio.run(body())


@pytest.mark.parametrize("kind", FAULTS)
@pytest.mark.parametrize("step", ["state", "message"])
def test_an_enqueue_sent_again_queues_the_task_once(net: Net, kind: str, step: str) -> None:
    async def body() -> None:
        q = net.store(nats_backend.NATSQueue)
        await q.open()
        t = _task()
        match = b"Omniq-State: waiting" if step == "state" else f"HPUB {net.prefix}.tasks.".encode()
        net.inject(kind, match)
        with pytest.raises(BackendUnavailable):
            await q.enqueue(t)
        assert await _eventually(lambda: q.enqueue(t)) == t.id
        info = await q._conn.js.stream_info(f"{net.prefix}_tasks")
        assert info.state.messages == 1  # a publish sent again was dropped by its msg id
        d = await q.dequeue(["default"], 30, 5)
        assert d is not None and d.task == t and d.attempt == 1
        assert await q.dequeue(["default"], 30, 0) is None
        assert await q.ack(d) is True
        await q.close()

    asyncio.run(body())


# --- the fused operations (one Backend holding the three roles) --------------------------


@pytest.mark.parametrize("kind", FAULTS)
@pytest.mark.parametrize("step", ["state", "message"])
def test_a_fused_submit_sent_again_queues_the_task_once(net: Net, kind: str, step: str) -> None:
    async def body() -> None:
        b = await net.backend()
        t = _task()
        event = _enqueued(t)
        # The state goes out with the ENQUEUED event, the message after it.
        match = b"Omniq-State: waiting" if step == "state" else f"HPUB {net.prefix}.tasks.".encode()
        net.inject(kind, match)
        with pytest.raises(BackendUnavailable):
            await b.submit(t, event)
        assert await _eventually(lambda: b.submit(t, event)) == t.id
        info = await b.queue()._conn.js.stream_info(f"{net.prefix}_tasks")
        assert info.state.messages == 1  # a publish sent again was dropped by its msg id
        assert _kinds(await b.events().get(t.id)) == [("enqueued", 0)]
        (d,) = await b.claim(["default"], 30, 5, 4, "w1")
        assert d.task == t and d.attempt == 1
        await _close(*_stores(b))

    asyncio.run(body())


@pytest.mark.parametrize("kind", FAULTS)
@pytest.mark.parametrize("step", ["lease", "started"])
def test_a_fused_claim_whose_reply_never_came_is_delivered_by_the_next_claim(
    net: Net, kind: str, step: str
) -> None:
    async def body() -> None:
        b = await net.backend()
        tasks = [_task() for _ in range(3)]
        for t in tasks:
            await b.submit(t, _enqueued(t))
        # The batch's leases go out together; then the STARTED events of those won.
        match = b"Omniq-State: running" if step == "lease" else f"{net.prefix}.events.".encode()
        net.inject(kind, match)
        with pytest.raises(BackendUnavailable):
            await b.claim(["default"], 30, 2, 3, "w1")
        got: list[Any] = []
        while len(got) < 3:  # taken or not, each comes now as its first attempt, once
            got += await _eventually(lambda: b.claim(["default"], 30, 5, 3, "w1"))
        assert sorted(d.task.id for d in got) == sorted(t.id for t in tasks)
        assert {d.attempt for d in got} == {1}
        assert await b.claim(["default"], 30, 0, 3, "w1") == []
        for d in got:
            assert _kinds(await b.events().get(d.task_id)) == [("enqueued", 0), ("started", 1)]
        await _close(*_stores(b))

    asyncio.run(body())


def _finish_match(net: Net, step: str) -> bytes:
    if step == "result":
        return f"$KV.{net.prefix}_results.".encode()
    if step == "event":  # goes out with the fenced removal of the task's state
        return f"{net.prefix}.events.".encode()
    return f"$JS.API.STREAM.PURGE.KV_{net.prefix}_queue".encode()


@pytest.mark.parametrize("kind", FAULTS)
@pytest.mark.parametrize("step", ["result", "event", "ack"])
def test_a_fused_finish_sent_again_stores_one_outcome(net: Net, kind: str, step: str) -> None:
    async def body() -> None:
        b = await net.backend()
        t = _task()
        await b.submit(t, _enqueued(t))
        (d,) = await b.claim(["default"], 30, 5, 1, "w1")
        result = TaskResult(t.id, TaskStatus.COMPLETED, value=3, attempts=1, worker_id="w1")
        done = TaskEvent(t.id, EventType.COMPLETED, attempt=1, worker_id="w1")
        net.inject(kind, _finish_match(net, step))
        with pytest.raises(BackendUnavailable):
            await b.finish(d, result, done, failed=False)
        assert await _eventually(lambda: b.finish(d, result, done, failed=False)) is True
        assert await b.results().get(t.id) == result
        assert _kinds(await b.events().get(t.id)) == [
            ("enqueued", 0), ("started", 1), ("completed", 1)
        ]
        assert await b.queue().get_task(t.id) is None and await b.queue().stats() == []
        await _close(*_stores(b))

    asyncio.run(body())


# --- a worker under chaos ----------------------------------------------------------------

CHAOS_TASKS = 200
CHAOS_FOR = 30.0  # seconds of faults; then the network calms down and the rest drains


@pytest.mark.timeout(300)
def test_a_worker_under_chaos_records_each_outcome_once(net: Net) -> None:
    async def body() -> None:
        tasks = [Task(func="omniq.examples:add", args=(i, i)) for i in range(CHAOS_TASKS)]
        producer = net.direct(nats_backend.NATSQueue)
        for t in tasks:
            await producer.enqueue(t)
        stores = [net.store(cls) for cls in (nats_backend.NATSQueue,
                                              nats_backend.NATSResultStorage,
                                              nats_backend.NATSEventStorage)]
        for store in stores:
            await _eventually(store.open)
        net.proxy.chaos(0.05, kinds=FAULTS, delay=TIMEOUT * 2)
        # On a timer, not between worker runs: a run ends only once the queue is empty.
        asyncio.get_running_loop().call_later(CHAOS_FOR, net.proxy.calm)
        await _work_until_done(net, stores, tasks)
        assert sum(net.proxy.injected.values()) >= 10, net.proxy.injected
        await _check_outcomes(net, tasks)
        await _close(producer, *stores)

    asyncio.run(asyncio.wait_for(body(), 400))


async def _work_until_done(net: Net, stores: list[Any], tasks: list[Task]) -> None:
    settings = WorkerSettings(
        concurrency=4, lease=10.0, poll_interval=0.5, burst=True, register=False
    )
    queue, results, events = stores
    checker = net.direct(nats_backend.NATSResultStorage)
    deadline = time.monotonic() + CHAOS_FOR + 120
    pending = {t.id for t in tasks}
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} tasks never finished"
        await Worker(queue, results, events, settings).run()
        found = await asyncio.gather(*(checker.get(tid) for tid in pending))
        pending = {tid for tid, r in zip(list(pending), found, strict=True) if r is None}
        if pending:
            await asyncio.sleep(0.5)  # parked tasks come back after their lease
    await checker.close()


async def _check_outcomes(net: Net, tasks: list[Task]) -> None:
    results = net.direct(nats_backend.NATSResultStorage)
    events = net.direct(nats_backend.NATSEventStorage)
    for t in tasks:
        result = await results.get(t.id)
        assert result is not None and result.value == t.args[0] * 2, (t.id, result)
        got = await events.get(t.id)
        ids = Counter(e.id for e in got)
        assert max(ids.values()) == 1, f"an event of {t.id} stored twice: {got}"
        outcomes = [e for e in got if e.event_type in OUTCOMES]
        assert len(outcomes) == 1, f"{t.id}: {[e.event_type.value for e in got]}"
        started = Counter(e.attempt for e in got if e.event_type == EventType.STARTED)
        assert started and max(started.values()) == 1, f"{t.id}: {got}"
    await _close(results, events)
