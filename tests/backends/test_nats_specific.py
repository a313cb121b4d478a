"""NATS-only behaviour: configuration, unreachable/misconfigured servers, restarts, fork, lanes.

Servers that get killed or misconfigured are private nats-server processes on
spare ports; the shared one on 4222 is only used for data tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest

from omniq.errors import BackendUnavailable, ConfigError
from omniq.models import EventType, Task, TaskEvent, TaskResult, TaskStatus, seconds_from_now
from tests.servers import NatsServer, drop_namespace, free_port, port_open, private_nats, require

nats_backend = pytest.importorskip("omniq.backends.nats", reason="nats-py is not installed")

SHARED = "nats://127.0.0.1:4222"
T = TypeVar("T")


def _need(reason: str | None) -> None:
    require(reason, "NATS")  # skip locally, fail in CI


@pytest.fixture
def private_server() -> Iterator[Callable[..., NatsServer]]:
    """start(*nats_server_args, jetstream=False) -> a private nats-server (tests/servers.py)."""
    with contextlib.ExitStack() as stack:

        def start(*args: str, jetstream: bool = False) -> NatsServer:
            return stack.enter_context(private_nats(*args, jetstream=jetstream))

        yield start


@pytest.fixture
def shared_prefix() -> Iterator[str]:
    _need(None if port_open(4222) else "no NATS server on 127.0.0.1:4222")
    prefix = "sp_" + uuid.uuid4().hex[:10]
    yield prefix
    drop_namespace("nats", prefix, SHARED)


def _task(queue: str = "default", **kw: Any) -> Task:
    return Task(func="omniq.examples:add", args=(1, 2), queue=queue, **kw)


async def _eventually(fn: Callable[[], Awaitable[T]], within: float = 20.0) -> T:
    """Retry `fn` while the backend is unavailable (a server coming back)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await fn()
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# --- configuration ---------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "a.b", "with space", "star*", "x" * 65, "gt>"])
def test_bad_prefix_is_a_config_error(prefix: str) -> None:
    with pytest.raises(ConfigError, match="prefix"):
        nats_backend.NATSQueue(prefix=prefix)
    with pytest.raises(ConfigError, match="prefix"):
        nats_backend.create("results", {"prefix": prefix})


def test_constructors_do_not_connect() -> None:
    nats_backend.NATSResultStorage(servers=["nats://localhost:4222"])
    nats_backend.NATSEventStorage(servers="nats://nowhere.invalid:4222")
    nats_backend.NATSQueue(servers=["nats://u:p@10.255.255.1:1"], prefix="ok-name_1")


def test_create_maps_settings_and_rejects_foreign_keys() -> None:
    store = nats_backend.create("queue", {"url": "nats://h:1", "prefix": "pp"})
    assert isinstance(store, nats_backend.NATSQueue) and store.prefix == "pp"
    assert store._conn.servers == ["nats://h:1"]
    store = nats_backend.create("events", {"host": "h2", "port": 4333})
    assert store._conn.servers == ["nats://h2:4333"]
    with pytest.raises(ConfigError, match="dsn"):
        nats_backend.create("results", {"dsn": "postgresql://x"})
    with pytest.raises(ConfigError, match="server"):
        nats_backend.create("results", {"servers": []})


# --- unreachable and misconfigured servers -----------------------------------


def test_unreachable_server_is_unavailable_without_password() -> None:
    port = free_port()  # nothing listens there

    async def body() -> None:
        store = nats_backend.NATSResultStorage(servers=[f"nats://bob:s3cret@127.0.0.1:{port}"])
        with pytest.raises(BackendUnavailable) as info:
            await asyncio.wait_for(store.open(), 30)  # guards against a hang, not a speed check
        message = str(info.value)
        assert "s3cret" not in message and "\n" not in message
        assert f"127.0.0.1:{port}" in message
        await store.close()

    asyncio.run(body())


def test_bad_credentials_are_unavailable(private_server: Callable[..., NatsServer]) -> None:
    server = private_server("--user", "alice", "--pass", "right")

    async def body() -> None:
        store = nats_backend.NATSQueue(server.url, username="alice", password="wrong-pw")
        with pytest.raises(BackendUnavailable, match="credentials") as info:
            await asyncio.wait_for(store.open(), 30)
        assert "wrong-pw" not in str(info.value)
        good = nats_backend.NATSQueue(server.url, username="alice", password="right")
        with pytest.raises(BackendUnavailable, match="JetStream is not enabled"):
            await good.open()  # authenticated; this server has no JetStream
        await good.close()

    asyncio.run(body())


def test_jetstream_disabled_gives_one_clear_line(
    private_server: Callable[..., NatsServer],
) -> None:
    server = private_server()  # no -js

    async def body() -> None:
        for cls in (nats_backend.NATSQueue, nats_backend.NATSResultStorage,
                    nats_backend.NATSEventStorage):
            store = cls(servers=[server.url])
            with pytest.raises(BackendUnavailable) as info:
                await asyncio.wait_for(store.open(), 30)
            assert str(info.value) == (
                f"JetStream is not enabled on nats://127.0.0.1:{server.port}; "
                "start nats-server with -js"
            )
            await store.close()

    asyncio.run(body())


# --- server restart ------------------------------------------------------------


def test_stores_opened_before_a_restart_work_after_it(
    private_server: Callable[..., NatsServer],
) -> None:
    server = private_server(jetstream=True)  # its JetStream store survives the restart

    async def body() -> None:
        q = nats_backend.NATSQueue(server.url, prefix="rs")
        results = nats_backend.NATSResultStorage(server.url, prefix="rs")
        events = nats_backend.NATSEventStorage(server.url, prefix="rs")
        for store in (q, results, events):
            await store.open()
        before = _task()
        await q.enqueue(before)
        await events.append(TaskEvent(task_id=before.id, event_type=EventType.ENQUEUED))

        server.kill()
        deadline = time.monotonic() + 10
        while q._conn.nc.is_connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # until the client notices, or a request would time out
        with pytest.raises(BackendUnavailable):
            await asyncio.wait_for(q.dequeue(["default"], 30, 0), 30)
        server.start()

        d = await _eventually(lambda: q.dequeue(["default"], 30, 2))
        assert d is not None and d.task == before and d.attempt == 1
        await _eventually(lambda: results.store(TaskResult(before.id, TaskStatus.COMPLETED, 3)))
        got = await _eventually(lambda: results.wait(before.id, 5))
        assert got is not None and got.value == 3
        await _eventually(lambda: q.ack(d))
        after = _task()
        await _eventually(lambda: q.enqueue(after))
        d2 = await _eventually(lambda: q.dequeue(["default"], 30, 5))
        assert d2 is not None and d2.task.id == after.id
        await _eventually(
            lambda: events.append(TaskEvent(task_id=before.id, event_type=EventType.COMPLETED))
        )
        kinds = [e.event_type for e in await _eventually(lambda: events.get(before.id))]
        assert kinds == [EventType.ENQUEUED, EventType.COMPLETED]
        for store in (q, results, events):
            await store.close()

    asyncio.run(body())


def test_a_write_while_the_server_is_down_fails_at_once_and_is_never_sent_later(
    private_server: Callable[..., NatsServer],
) -> None:
    # nats-py used to keep such a publish and send it once reconnected: the event landed
    # after its caller had been told it failed (5 s later), ahead of older events that
    # the event buffer then wrote back in order.
    server = private_server(jetstream=True)

    async def body() -> None:
        events = nats_backend.NATSEventStorage(server.url, prefix="od")
        first = TaskEvent(task_id=_task().id, event_type=EventType.ENQUEUED)
        await events.append(first)
        server.stop()
        deadline = time.monotonic() + 10
        while events._conn.nc.is_connected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        late = TaskEvent(task_id=first.task_id, event_type=EventType.STARTED, attempt=1)
        began = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await events.append(late)
        assert time.monotonic() - began < 0.5  # not the request timeout (5 s)
        server.start()
        got = await _eventually(lambda: events.get(first.task_id))
        await asyncio.sleep(0.5)  # anything nats-py held would have gone out by now
        assert [e.id for e in await events.get(first.task_id)] == [e.id for e in got] == [first.id]
        await events.close()

    asyncio.run(body())


def test_stores_of_one_place_share_one_backend_and_connection(shared_prefix: str) -> None:
    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        r = nats_backend.create("results", {"servers": [SHARED], "prefix": shared_prefix})
        e = nats_backend.create("events", {"url": SHARED, "prefix": shared_prefix})
        assert q.backend is r.backend is e.backend
        assert nats_backend.create("queue", {"servers": [SHARED], "prefix": "other"}).backend \
            is not q.backend
        for store in (q, r, e):
            await store.open()
        assert q._conn.nc is r._conn.nc is e._conn.nc
        await q.close()
        await r.close()
        assert e._conn.nc.is_connected  # the last store still uses it
        await e.close()

    asyncio.run(body())


def test_unknown_settings_are_refused_once() -> None:
    with pytest.raises(ConfigError, match="does not use 'dsn'"):
        nats_backend.create("queue", {"dsn": "x", "prefix": "p"})


# --- fork ------------------------------------------------------------------------


def _child_uses_parent_store(store: Any, task_id: str, out: Any) -> None:
    async def body() -> None:
        d = await store.dequeue(["default"], 30, 5)
        out.put(None if d is None else d.task.id)
        if d is not None:
            await store.ack(d)
        await store.close()

    asyncio.run(body())


def test_forked_child_reconnects_instead_of_sharing_sockets(shared_prefix: str) -> None:
    q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
    t = _task()
    asyncio.run(q.enqueue(t))  # opened in the parent
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_uses_parent_store, args=(q, t.id, out))
    child.start()
    child.join(30)
    assert out.get(timeout=5) == t.id

    async def parent_still_works() -> None:
        assert await q.get_task(t.id) is None  # acked by the child
        await q.close()

    asyncio.run(parent_still_works())


# --- lanes, scheduling and cleanup ------------------------------------------------


def test_priority_levels_enqueued_elsewhere_are_found(shared_prefix: str) -> None:
    async def body() -> None:
        producer = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        low, high = _task(priority=-3), _task(priority=9)
        await producer.enqueue(low)
        await producer.enqueue(high)
        consumer = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)  # a fresh process
        order = []
        for _ in range(2):
            d = await consumer.dequeue(["default"], 30, 2)
            assert d is not None
            order.append(d.task.id)
            await consumer.ack(d)
        assert order == [high.id, low.id]
        await producer.close()
        await consumer.close()

    asyncio.run(body())


def test_early_fetch_of_a_scheduled_task_counts_no_attempt(shared_prefix: str) -> None:
    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        t = _task(eta=seconds_from_now(0.6))
        await q.enqueue(t)
        assert await q.dequeue(["default"], 30, 0) is None  # fetched and parked
        d = await q.dequeue(["default"], 30, 5)
        assert d is not None and d.task.id == t.id and d.attempt == 1
        await q.close()

    asyncio.run(body())


def test_cancelled_and_purged_tasks_leave_no_messages(shared_prefix: str) -> None:
    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        cancelled = await q.enqueue(_task())
        assert await q.cancel(cancelled)
        assert await q.dequeue(["default"], 30, 0) is None  # drops the orphan message
        for _ in range(3):
            await q.enqueue(_task("p"))
        assert await q.purge("p") == 3
        info = await q._conn.js.stream_info(f"{shared_prefix}_tasks")
        assert info.state.messages == 0
        assert await q.stats() == []
        await q.close()

    asyncio.run(body())


def test_unique_key_survives_a_holder_that_vanished(shared_prefix: str) -> None:
    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        first = await q.enqueue(_task(unique_key="job"))
        # Simulate a crash between finishing the task and freeing its key.
        await q._state.purge(nats_backend.task_key(first))
        second = await q.enqueue(_task(unique_key="job"))
        assert second != first
        assert await q.enqueue(_task(unique_key="job")) == second
        await q.close()

    asyncio.run(body())


async def _stranded(q: Any, task: Task) -> None:
    """What a producer killed between the task's state and its message leaves."""
    await q._ready()
    await q._put_waiting(task, nats_backend.task_key(task.id))


async def _first_nonzero(fn: Callable[[], Awaitable[int]], within: float = 5.0) -> int:
    deadline = time.monotonic() + within
    while not (found := await fn()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return found


def test_an_enqueue_whose_producer_died_half_way_is_finished_by_an_idle_worker(
    shared_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniq.backends.nats import queue as nats_queue

    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        lost = _task()
        await _stranded(q, lost)
        assert [s.queued for s in await q.stats()] == [1]
        assert await q.claim_many(["default"], 30, 0.3, 10) == []  # no message: never handed out
        assert await q.finish_stranded() == 0  # too young: its message may be on its way
        monkeypatch.setattr(nats_queue, "STRANDED_AFTER", 0.0)
        monkeypatch.setattr(nats_queue, "SWEEP_EVERY", 0.0)
        dispatcher = await q._lanes()
        assert dispatcher.sweeper is not None  # the idle claim above looked (too young)
        await dispatcher.sweeper
        assert dispatcher.sweep_gaps == 1  # a look that found none: the next waits longer
        # An idle claim starts the sweep (no message left in the queue), which finishes it.
        assert await q.claim_many(["default"], 30, 0.1, 10) == []
        got = await q.claim_many(["default"], 30, 10, 10)
        assert [d.task_id for d in got] == [lost.id]
        assert dispatcher.sweep_gaps == 0
        assert await q.finish_stranded() == 0  # nothing more to finish
        await q.close()

    asyncio.run(body())


def test_a_stranded_task_whose_unique_key_went_to_another_is_dropped(
    shared_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniq.backends.nats import queue as nats_queue

    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        # Died before taking the key; another firing of the slot took it, ran and finished.
        await _stranded(q, _task(unique_key="slot", unique_ttl=600))
        holder = await q.enqueue(_task(unique_key="slot", unique_ttl=600))
        (d,) = await q.claim_many(["default"], 30, 5, 10)
        assert d.task_id == holder and await q.ack(d)
        monkeypatch.setattr(nats_queue, "STRANDED_AFTER", 0.0)
        assert await _first_nonzero(q.finish_stranded) == 1
        assert sum(s.queued + s.running for s in await q.stats()) == 0  # dropped, not run
        assert await q.claim_many(["default"], 30, 0.3, 10) == []
        await q.close()

    asyncio.run(body())


def test_stranded_tasks_wait_while_their_queue_has_messages(
    shared_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniq.backends.nats import queue as nats_queue

    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        monkeypatch.setattr(nats_queue, "STRANDED_AFTER", 0.0)
        await q.enqueue(_task())  # its message could stand for any waiting task
        await _stranded(q, _task())
        assert await q.finish_stranded() == 0
        (d,) = await q.claim_many(["default"], 30, 5, 10)
        assert await q.finish_stranded() == 0  # a running task's message stays till its ack
        assert await q.ack(d)  # its message goes (the ack's +ACK is not waited for)
        assert await _first_nonzero(q.finish_stranded) == 1  # the queue drained
        await q.close()

    asyncio.run(body())


def test_a_message_that_is_not_a_task_is_dropped(shared_prefix: str) -> None:
    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        await q.open()
        await q._conn.js.publish(f"{shared_prefix}.tasks.default.p0", b"not json")
        good = await q.enqueue(_task())
        d = await q.dequeue(["default"], 30, 2)
        assert d is not None and d.task.id == good
        await q.close()

    asyncio.run(body())


# --- issue 8: bad data, data of an older omniq, a worker that died with messages -------


def _h(name: str) -> str:
    return str(getattr(nats_backend.queue, name))


async def _plant(q: Any, task_id: str, payload: bytes, queue: str, *, legacy: bool) -> None:
    """Write a task as a producer would, with `payload` as its stored bytes. `legacy`:
    as an omniq before issue 8 wrote it (no id headers; the message id is the task id)."""
    await q.open()
    meta = {} if legacy else {_h("H_ID"): task_id, _h("H_PRIORITY"): "0"}
    state = {**meta, _h("H_STATE"): "waiting", _h("H_QUEUE"): queue, _h("H_ATTEMPTS"): "0"}
    rev = await q._state.put(nats_backend.task_key(task_id), payload, state)
    headers = {**meta, _h("H_REV"): str(rev), "Nats-Msg-Id": task_id}
    await q._conn.js.publish(f"{q.prefix}.tasks.{queue}.p0", payload, headers=headers)


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "older-omniq"])
def test_a_task_stored_undecodable_is_delivered_as_a_problem(
    shared_prefix: str, legacy: bool
) -> None:
    # Before issue 8 such a message was dropped with +TERM and its task stayed pending.
    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        tid = _task().id
        await _plant(q, tid, b"\xff\xfe not json", "cq", legacy=legacy)
        d = await q.dequeue(["cq"], 30, 2)
        assert d is not None and d.problem and (d.task.id, d.task.queue) == (tid, "cq")
        assert d.attempt == 1
        assert await q.ack(d, failed=True) is True
        assert [(s.queue, s.failed, s.queued) for s in await q.stats()] == [("cq", 1, 0)]
        await q.close()

    asyncio.run(body())


def test_a_task_enqueued_by_an_older_omniq_is_still_run(shared_prefix: str) -> None:
    from omniq.serialization import encode_task

    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        t = _task("lg")
        await _plant(q, t.id, encode_task(t), "lg", legacy=True)
        d = await q.dequeue(["lg"], 30, 2)
        assert d is not None and d.task == t and d.problem is None and d.attempt == 1
        assert await q.ack(d) is True
        assert await q.get_task(t.id) is None
        await q.close()

    asyncio.run(body())


def test_an_events_stream_of_an_older_omniq_gets_the_dedupe_window(shared_prefix: str) -> None:
    import nats
    from nats.js import api

    from omniq.serialization import event_to_dict

    async def body() -> None:
        old = TaskEvent(task_id=_task().id, event_type=EventType.ENQUEUED)
        record = event_to_dict(old)
        del record["id"], record["v"]  # as stored before events had ids
        nc = await nats.connect(SHARED)
        js = nc.jetstream()
        await js.add_stream(api.StreamConfig(  # the server's default window: 2 minutes
            name=f"{shared_prefix}_events", subjects=[f"{shared_prefix}.events.>"],
            allow_direct=True,
        ))
        await js.publish(f"{shared_prefix}.events.{old.task_id}", json.dumps(record).encode())
        events = nats_backend.NATSEventStorage(SHARED, prefix=shared_prefix)
        await events.open()
        info = await js.stream_info(f"{shared_prefix}_events")
        assert info.config.duplicate_window == nats_backend.EVENT_DEDUPE_WINDOW
        new = TaskEvent(task_id=old.task_id, event_type=EventType.STARTED, attempt=1)
        await events.append(new)
        await events.append(new)
        got = await events.get(old.task_id)
        assert [e.event_type for e in got] == [EventType.ENQUEUED, EventType.STARTED]
        assert got[0].id.startswith("legacy-") and got[1] == new
        await events.close()
        await nc.close()

    asyncio.run(body())


def test_messages_a_dead_worker_had_fetched_come_back_soon(shared_prefix: str) -> None:
    # Issue 8 item 2: a worker killed by one task must not hold the tasks it had pulled
    # for the consumer's old AckWait (30 s) while the killer comes back with them.
    import nats

    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        ids = {await q.enqueue(_task()) for _ in range(5)}
        lane = (await (await q._lanes()).lanes(["default"]))[0]
        dead = await nats.connect(SHARED)  # another process: pulls all, then dies
        inbox = dead.new_inbox()
        sub = await dead.subscribe(inbox)
        await dead.publish(f"$JS.API.CONSUMER.MSG.NEXT.{shared_prefix}_tasks.{lane.consumer}",
                           b'{"batch": 5, "no_wait": true}', reply=inbox)
        for _ in range(5):
            await sub.next_msg(timeout=5)
        await dead.close()
        began = time.monotonic()
        got = set()
        while len(got) < 5 and time.monotonic() - began < 40:
            d = await q.dequeue(["default"], 30, 1)
            if d is not None:
                got.add(d.task.id)
                assert d.attempt == 1 and await q.ack(d) is True
        assert got == ids
        assert time.monotonic() - began < nats_backend.ACK_WAIT + 3
        await q.close()

    asyncio.run(body())


def test_concurrent_enqueues_with_one_unique_key_store_one_task(shared_prefix: str) -> None:
    async def body() -> None:
        handles = [nats_backend.NATSQueue(SHARED, prefix=shared_prefix) for _ in range(4)]
        ids = await asyncio.gather(*(h.enqueue(_task(unique_key="once")) for h in handles * 3))
        assert len(set(ids)) == 1
        assert [s.queued for s in await handles[0].stats()] == [1]
        for h in handles:
            await h.close()

    asyncio.run(body())


def test_authorization_error_wins_over_a_later_connection_reset() -> None:
    # The server closes the socket right after its -ERR: the second connect attempt
    # then fails with "connection reset", which used to hide the real reason.
    import nats.errors

    conn = nats_backend.NATSQueue("nats://127.0.0.1:1")._conn
    conn._errors = [nats.errors.AuthorizationError(), ConnectionResetError(104, "reset")]
    conn._last_error = ConnectionResetError(104, "reset")
    message = conn._refusal(ConnectionResetError(104, "reset"))
    assert "refused the credentials" in message


def test_many_first_opens_of_one_prefix_all_succeed() -> None:
    # Racing creators of one stream get "name in use" or, when another won a moment
    # earlier, "subjects overlap": both mean the stream is there. Before the fix,
    # 30 rounds failed every run.
    _need(None if port_open(4222) else "no NATS server on 127.0.0.1:4222")
    prefixes = ["race_" + uuid.uuid4().hex[:8] for _ in range(30)]

    async def body() -> None:
        for prefix in prefixes:
            # As 16 processes would: a Backend (and connection) each, so settings that
            # differ in something harmless.
            handles = [nats_backend.NATSQueue(SHARED, prefix=prefix, request_timeout=5 + i / 100)
                       for i in range(16)]
            outcomes = await asyncio.gather(*(h.open() for h in handles), return_exceptions=True)
            for h in handles:
                await h.close()
            assert [o for o in outcomes if isinstance(o, Exception)] == []

    try:
        asyncio.run(body())
    finally:
        for prefix in prefixes:
            drop_namespace("nats", prefix, SHARED)


def test_a_store_handed_to_two_users_stays_open_for_the_one_left(shared_prefix: str) -> None:
    # A client and `omniq status`'s probe in one process get the same store object.
    async def body() -> None:
        settings = {"servers": [SHARED], "prefix": shared_prefix}
        mine = nats_backend.create("queue", settings)
        probe = nats_backend.create("queue", settings)
        assert probe is mine
        await mine.open()
        await probe.open()
        await probe.close()
        t = _task()
        await mine.enqueue(t)  # still open, and its connection still the same
        d = await mine.dequeue(["default"], 30, 5)
        assert d is not None and d.task == t and await mine.ack(d)
        await mine.close()
        assert mine._conn.current() is None  # the last user closed it

    asyncio.run(body())


# --- issue 11: release with a delay, failed(), forget(), records, get_many ---------------

US = timedelta(microseconds=1)


def _fresh(prefix: str, **kw: Any) -> Any:
    """A queue on a Backend of its own (as another process would have: it sets up its
    streams, and reads the dead-letter marker, afresh)."""
    return nats_backend.NATSQueue(SHARED, prefix=prefix,
                                  request_timeout=5 + uuid.uuid4().int % 1000 / 1e4, **kw)


async def _dead(q: Any, queue: str = "default", **kw: Any) -> Task:
    t = _task(queue, **kw)
    await q.enqueue(t)
    d = await q.dequeue([queue], 30, 5)
    assert d is not None and d.task.id == t.id
    assert await q.ack(d, failed=True) is True
    return t


class _Wire:
    """What a store's connection sends from now on: requests (every message published,
    by kind) and round trips (waits for replies)."""

    def __init__(self, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: Counter[str] = Counter()
        self.trips = 0
        nc = store._conn.nc
        publish, replies = nc.publish, store._conn.replies
        pulled = nats_backend.connection._Pulled.next

        async def counting_publish(subject: str, payload: bytes = b"", **kw: Any) -> None:
            parts = subject.split(".")
            self.sent[parts[2] if parts[0] == "$JS" else parts[1]] += 1
            await publish(subject, payload, **kw)

        async def counting_replies(futures: Any) -> Any:
            self.trips += 1
            return await replies(futures)

        async def counting_pull(this: Any, *args: Any) -> Any:
            self.trips += 1
            return await pulled(this, *args)

        monkeypatch.setattr(nc, "publish", counting_publish)
        monkeypatch.setattr(store._conn, "replies", counting_replies)
        monkeypatch.setattr(nats_backend.connection._Pulled, "next", counting_pull)

    @property
    def requests(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()
        self.trips = 0


async def _failed_stream(q: Any) -> Any:
    return (await q._conn.js.stream_info(f"{q.prefix}_failed")).state


def test_a_claim_stores_no_started_for_a_task_that_waits_for_others(shared_prefix: str) -> None:
    async def body() -> None:
        b = nats_backend.backend_for(nats_backend.NATSSettings(servers=[SHARED],
                                                               prefix=shared_prefix))
        q, e = b.queue(), b.events()
        async with q, e:
            plain, waits = _task("dep"), _task("dep", after=(_task().id,))
            for t in (plain, waits):
                await q.enqueue(t)
            got = {d.task.id: d for d in await b.claim(["dep"], 30, 2, 5, "w1")}
            assert set(got) == {plain.id, waits.id}
            assert [x.event_type for x in await e.get(plain.id)] == [EventType.STARTED]
            assert await e.get(waits.id) == []
            await q.release(got[waits.id], 0.5)
            (stats,) = await q.stats()
            assert (stats.scheduled, stats.running, stats.queued) == (1, 1, 0)
            assert await b.claim(["dep"], 30, 0, 1, "w1") == []  # parked until then
            (again,) = await b.claim(["dep"], 30, 5, 1, "w1")
            assert again.task.id == waits.id and again.attempt == 1  # not counted
            assert await e.get(waits.id) == []

    asyncio.run(body())


def test_failed_costs_the_same_however_many_dead_letters(
    shared_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        for _ in range(4):
            await asyncio.gather(*(q.enqueue(_task("bulk")) for _ in range(100)))
        for name in ("fa", "fb") * 10:
            await _dead(q, name)
        wire = _Wire(q, monkeypatch)
        costs = []
        for more in (0, 160):
            for _ in range(more // 2):
                await _dead(q, "fa"), await _dead(q, "fb")
            await q._conn.flush_soon()  # the last acks, not failed()'s requests
            wire.reset()
            page = await q.failed(limit=5)
            assert len(page) == 5 and page[0].failed_at > page[-1].failed_at
            costs.append((wire.requests, wire.trips, dict(wire.sent)))
        # The newest record (1 direct get), a consumer at the window's start, one pull of
        # its 8 records (6 wanted, a quarter more), the consumer's deletion (not awaited),
        # 8 states (one round trip).
        assert costs[0] == costs[1] == (12, 4, {"DIRECT": 9, "CONSUMER": 3}), costs
        wire.reset()
        page = await q.failed("fa", limit=3)
        assert len(page) == 3 and {f.task.queue for f in page} == {"fa"}
        # Its first consumer's window held 2 of queue fa, not 4: placed once more, lower
        # (by the density seen) before its one pull.
        assert (wire.trips, wire.sent["CONSUMER"]) == (5, 5)
        # Holes among the newest records (dead letters forgotten, or queued again): the
        # same, one more placement.
        newest = await q.failed(limit=8)
        assert await q.forget([f.task.id for f in newest[1:6:2]]) == 3
        wire.reset()
        page = await q.failed(limit=5)
        assert [f.task.id for f in page] == [newest[i].task.id for i in (0, 2, 4, 6, 7)]
        assert (wire.trips, wire.sent["CONSUMER"]) == (5, 5)
        await q.close()

    asyncio.run(body())


async def _move_records(q: Any, times: dict[str, int]) -> None:
    """Make the failure records those of a store moved from an older omniq: each with
    the failure time given (us), oldest first, and the marker saying where they end."""
    from omniq.backends.nats import deadletters, headers

    nc = q._conn.nc
    await nc.request(f"$JS.API.STREAM.PURGE.{q.prefix}_failed", b"{}", timeout=5)
    for task_id, at in sorted(times.items(), key=lambda kv: kv[1]):
        entry = await q._state.get(nats_backend.task_key(task_id))
        heads = {headers.H_ID: task_id, headers.H_QUEUE: entry.text(headers.H_QUEUE),
                 headers.H_CLAIM: entry.text(headers.H_CLAIM), headers.H_FAILED_AT: str(at)}
        subject = f"{q.prefix}.failed.{entry.text(headers.H_QUEUE)}.{task_id}"
        await q._conn.js.publish(subject, b"", headers=heads)
    last = (await _failed_stream(q)).last_seq
    await q._state.put(deadletters.MARKER, json.dumps({"block": last}).encode(), {})


def test_failed_pages_by_the_stored_microsecond(shared_prefix: str) -> None:
    from omniq.backends.nats.connection import at_us

    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        a, b, c, d = [await _dead(q, name) for name in ("f1", "f2", "f1", "f2")]
        base = 1_700_000_000_000_000
        # Failure times of our choosing: two dead letters of two queues share one us.
        await _move_records(q, {a.id: base, b.id: base + 7, c.id: base + 7, d.id: base + 9})
        await q.close()
        q = _fresh(shared_prefix)
        every = await q.failed()
        assert [f.task.id for f in every] == [d.id, c.id, b.id, a.id]  # a tie: newer first
        assert [f.failed_at for f in every] == [at_us(base + t) for t in (9, 7, 7, 0)]
        # A page does not end inside one microsecond: the tie comes whole.
        assert [f.task.id for f in await q.failed(limit=2)] == [d.id, c.id, b.id]
        assert [f.task.id for f in await q.failed(limit=1)] == [d.id]
        assert [f.task.id for f in await q.failed(before=every[1].failed_at)] == [a.id]
        assert [f.task.id for f in await q.failed(before=every[1].failed_at + US)] == [
            c.id, b.id, a.id]
        assert len(await q.failed(since=every[1].failed_at)) == 3  # inclusive
        assert len(await q.failed(since=every[1].failed_at + US)) == 1
        assert [f.task.id for f in await q.failed("f1")] == [c.id, a.id]
        assert await q.failed(limit=0) == [] and await q.failed("nowhere") == []
        # Newer failures are listed above the moved ones and page down into them.
        e = await _dead(q, "f1")
        seen, before = [], None
        while page := await q.failed(before=before, limit=2):
            seen += [f.task.id for f in page]
            before = page[-1].failed_at
        assert seen == [e.id, d.id, c.id, b.id, a.id]
        await q.close()

    asyncio.run(body())


def test_a_burst_of_failures_pages_without_a_gap_or_a_repeat(shared_prefix: str) -> None:
    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        tasks = [_task(("b1", "b2")[i % 2]) for i in range(40)]
        await asyncio.gather(*(q.enqueue(t) for t in tasks))
        got = await q.dequeue_many(["b1", "b2"], 30, 5, 64)
        while len(got) < 40:
            got += await q.dequeue_many(["b1", "b2"], 30, 5, 64)
        await asyncio.gather(*(q.ack(d, failed=True) for d in got))  # together
        seen, before, pages = [], None, 0
        while True:
            page = await q.failed(None, None, before, 7)
            pages += 1
            seen += [f.task.id for f in page]
            if len(page) < 7:
                break
            before = page[-1].failed_at
        assert sorted(seen) == sorted(t.id for t in tasks) and len(seen) == 40
        assert pages >= 6
        await q.close()

    asyncio.run(body())


def test_failed_skips_stale_records_and_reads_undecodable_dead_letters(
    shared_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniq.backends.nats import deadletters, headers
    from omniq.serialization import UNDECODABLE_FUNC

    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        old, bad = await _dead(q, "st"), await _dead(q, "st")
        waiting = _task("st")
        await q.enqueue(waiting)
        # Records whose state is not (or no longer) theirs: a waiting task, a claim that
        # lost its lease while failing the task, a task that is gone.
        for task_id, claim in ((waiting.id, ""), (old.id, "another-claim"), (_task().id, "")):
            heads = {headers.H_ID: task_id, headers.H_QUEUE: "st", headers.H_CLAIM: claim}
            await q._conn.js.publish(f"{shared_prefix}.failed.st.{task_id}", b"", headers=heads)
        entry = await q._state.get(nats_backend.task_key(bad.id))
        await q._state.put(entry.key, b"\xff not a task", {
            k: v for k, v in entry.headers.items() if k.startswith("Omniq-")})
        page = await q.failed("st", limit=2)
        assert [f.task.id for f in page] == [bad.id, old.id]  # still a full page
        assert page[0].task.func == UNDECODABLE_FUNC and page[0].task.queue == "st"
        assert (await _failed_stream(q)).messages == 5  # young stale records are kept
        monkeypatch.setattr(deadletters, "STALE", -1.0)
        assert [f.task.id for f in await q.failed("st")] == [bad.id, old.id]
        await asyncio.sleep(0.1)  # their deletion goes out with the next request
        await q.get_task(old.id)
        assert (await _failed_stream(q)).messages == 2
        await q.close()

    asyncio.run(body())


def test_a_dead_letter_queued_again_loses_its_record_before_it_runs(shared_prefix: str) -> None:
    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        t = await _dead(q, "rq")
        (first,) = await q.failed()
        assert await q.enqueue(t) == t.id  # as omniq.retry does
        assert await q.failed() == [] and (await _failed_stream(q)).messages == 0
        d = await q.dequeue(["rq"], 30, 5)
        assert d is not None and await q.ack(d, failed=True)
        (again,) = await q.failed()
        assert again.task.id == t.id and again.failed_at > first.failed_at
        await q.close()

    asyncio.run(body())


def test_purge_drops_the_records_of_the_dead_letters_it_drops(shared_prefix: str) -> None:
    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        kept = await _dead(q, "keep")
        for _ in range(3):
            await _dead(q, "pq")
        await q.enqueue(_task("pq"))
        assert await q.purge("pq") == 4
        assert [f.task.id for f in await q.failed()] == [kept.id]
        assert (await _failed_stream(q)).messages == 1
        await q.close()

    asyncio.run(body())


def test_forget_frees_the_key_and_the_records_and_counts_once(
    shared_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        keyed = await _dead(q, "fg", unique_key="nightly")
        many = [await _dead(q, "fg") for _ in range(3)]
        waiting = _task("fg")
        await q.enqueue(waiting)
        ids = [keyed.id, *(t.id for t in many)]
        wire = _Wire(q, monkeypatch)
        unknown = [_task().id for _ in range(300)]
        assert await q.forget([*ids, waiting.id, *unknown, *ids]) == 4  # a repeat counts once
        # 256 ids at a time: their states read together, the dead ones purged together,
        # then their records with the unique key's read, then the key's purge (4); the
        # next 56 ids: their states (1).
        assert wire.trips == 5
        wire.reset()
        assert await q.forget(ids) == 0
        assert wire.trips == 1 and await q.failed("fg") == []
        assert (await _failed_stream(q)).messages == 0
        assert [(s.queue, s.queued, s.failed) for s in await q.stats()] == [("fg", 1, 0)]
        fresh = _task("fg", unique_key="nightly")
        assert await q.enqueue(fresh) == fresh.id
        await q.close()

    asyncio.run(body())


def test_records_live_in_a_bucket_of_their_own(
    shared_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body() -> None:
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        await q.put_record("a.b", "c", b"1")
        await q.put_record("a", "b.c", b"2")
        await q.put_record("a", "x:y_z", b"3")
        bucket = f"KV_{shared_prefix}_records"
        info = await q._conn.js.stream_info(bucket, subjects_filter=">")
        assert sorted(info.state.subjects) == [
            f"$KV.{shared_prefix}_records.{k}" for k in ("a.b_dc", "a.x_cy__z", "a_db.c")]
        wire = _Wire(q, monkeypatch)
        assert await q.list_records("a") == [("b.c", b"2"), ("x:y_z", b"3")]
        assert (wire.requests, wire.trips) == (3, 2)  # which keys, then their values
        wire.reset()
        assert await q.list_records("cancel") == [] and (wire.requests, wire.trips) == (1, 1)
        wire.reset()
        # Names that could never be stored are never found (nothing is asked).
        assert await q.get_record("a", "no spaces") is None
        assert await q.list_records("no spaces") == []
        assert await q.delete_record("a", "") is False and wire.requests == 0
        assert await q.delete_record("a", "x:y_z") is True
        assert await q.delete_record("a", "x:y_z") is False
        assert await q.get_record("a.b", "c") == b"1"
        await q.close()

    asyncio.run(body())


def test_get_many_is_one_round_trip_for_many(
    shared_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body() -> None:
        r = nats_backend.NATSResultStorage(SHARED, prefix=shared_prefix)
        results = [TaskResult(_task().id, TaskStatus.COMPLETED, value=i) for i in range(3)]
        for result in results:
            await r.store(result)
        ids = [_task().id for _ in range(500)] + [x.task_id for x in results]
        wire = _Wire(r, monkeypatch)
        got = await r.get_many([*ids, results[0].task_id])
        assert got == {x.task_id: x for x in results}
        assert (wire.requests, wire.trips) == (503, 1)
        await r.close()

    asyncio.run(body())


async def _issue10_dead_letter(prefix: str, t: Task) -> None:
    """A dead letter as an omniq of issue 10 wrote it: a state entry, no failure record."""
    import nats

    from omniq.backends.nats import headers
    from omniq.serialization import encode_task

    nc = await nats.connect(SHARED)
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.create_key_value(bucket=f"{prefix}_queue", history=1, direct=True)
    heads = {headers.H_ID: t.id, headers.H_QUEUE: t.queue, headers.H_PRIORITY: "0",
             headers.H_STATE: "failed", headers.H_ATTEMPTS: "1",
             headers.H_CLAIM: uuid.uuid4().hex}
    await js.publish(f"$KV.{prefix}_queue.{nats_backend.task_key(t.id)}", encode_task(t),
                     headers=heads)
    await nc.close()


async def _written_at(prefix: str, t: Task) -> datetime:
    """When the server stored the task's state entry (its timestamp, to the us)."""
    import nats

    nc = await nats.connect(SHARED)
    subject = f"$KV.{prefix}_queue.{nats_backend.task_key(t.id)}"
    msg = await nc.request(f"$JS.API.DIRECT.GET.KV_{prefix}_queue",
                           json.dumps({"last_by_subj": subject}).encode(), timeout=5)
    await nc.close()
    stamp = (msg.headers or {})["Nats-Time-Stamp"]  # RFC 3339 with nanoseconds
    return datetime.fromisoformat(stamp[:26] + "+00:00")


def test_dead_letters_of_an_older_omniq_are_listed_with_their_failure_times(
    shared_prefix: str,
) -> None:
    async def body() -> None:
        old = [_task("up") for _ in range(3)]
        for t in old:
            await _issue10_dead_letter(shared_prefix, t)
            await asyncio.sleep(0.01)
        written = [await _written_at(shared_prefix, t) for t in old]
        q = nats_backend.NATSQueue(SHARED, prefix=shared_prefix)
        await q.open()  # gives them their records, with the times their states were written
        listed = await q.failed()
        assert [f.task for f in listed] == old[::-1]
        for f, at in zip(listed, written[::-1], strict=True):
            assert abs((f.failed_at - at).total_seconds()) <= 1e-6
        new = await _dead(q, "up")  # a failure of this omniq: above them
        assert [f.task.id for f in await q.failed(limit=2)] == [new.id, old[2].id]
        assert [f.task for f in await q.failed(before=listed[0].failed_at)] == old[1::-1]
        # An older worker still running beside writes one more: listed once stats() saw it.
        later = _task("up")
        await _issue10_dead_letter(shared_prefix, later)
        assert later.id not in {f.task.id for f in await q.failed()}
        assert [(s.queue, s.failed) for s in await q.stats()] == [("up", 5)]
        assert (await q.failed(limit=1))[0].task.id == later.id
        assert await q.forget([t.id for t in old]) == 3
        assert [f.task.id for f in await q.failed()] == [later.id, new.id]
        await q.close()
        again = _fresh(shared_prefix)  # the marker says it is done: nothing moved twice
        assert [f.task.id for f in await again.failed()] == [later.id, new.id]
        assert (await _failed_stream(again)).messages == 2
        await again.close()

    asyncio.run(body())


def _listed_soon(omniq: Any, expected: list[str], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while (listed := [f.task.id for f in omniq.failed()]) != expected:
        assert time.monotonic() < deadline, (listed, expected)
        time.sleep(0.05)


def test_dependencies_and_failed_tasks_through_a_worker(shared_prefix: str) -> None:
    """On one Backend (the fused claim and finish): a dependent task's one STARTED is
    the worker's; then the failed tasks in bulk."""
    from omniq import OmniQ
    from omniq.config import OmniQConfig
    from omniq.errors import TaskFailed

    where = {f"{role}_{key}": value
             for role in ("task_queue", "result_storage", "event_storage")
             for key, value in (("type", "nats"), ("servers", [SHARED]),
                                ("prefix", shared_prefix))}
    config = OmniQConfig.from_values(default_retry_delay=0.01,
                                     worker_queues=["default", "mail"], **where)

    def kinds(client: OmniQ, task_id: str) -> list[str]:
        return [e.event_type.value for e in client.get_events(task_id)]

    with OmniQ(config, embedded_worker="shared") as omniq:
        first = omniq.enqueue("omniq.examples:sleep", 0.3, "first")
        then = omniq.options(after=[first]).enqueue("omniq.examples:echo", "second")
        assert omniq.get_result(then, timeout=10) == {"args": ["second"], "kwargs": {}}
        assert kinds(omniq, then) == ["enqueued", "started", "completed"]
        bad = omniq.enqueue("omniq.examples:fail", "boom")
        dependent = omniq.options(after=[bad]).enqueue("omniq.examples:add", 1, 1)
        with pytest.raises(TaskFailed, match="dependency failed"):
            omniq.get_result(dependent, timeout=10)
        assert kinds(omniq, dependent) == ["enqueued", "failed"]
        mail = omniq.options(queue="mail").enqueue("omniq.examples:fail", "mail")
        with pytest.raises(TaskFailed):
            omniq.get_result(mail, timeout=10)
        # NATS finishes in two round trips: the result first, then the ack that files the
        # dead letter, so a waiter can see a failure a moment before `failed()` lists it.
        _listed_soon(omniq, [mail, dependent, bad])
        assert omniq.failed(queue="mail")[0].error == "RuntimeError: mail"
        assert omniq.retry_failed(queue="default", func="fail") == [bad]
        with pytest.raises(TaskFailed):
            omniq.get_result(bad, timeout=10)  # ran again, failed again
        assert omniq.purge_failed(queue="mail") == [mail]
        _listed_soon(omniq, [bad, dependent])
