"""Redis-only behaviour: URLs and auth, error translation, key prefixes, TTLs, the
capped stream, and recovery after a server restart (on a private redis-server)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from omniq.backends.redis import (
    RedisBackend,
    RedisEventStorage,
    RedisQueue,
    RedisResultStorage,
    RedisSettings,
    create,
)
from omniq.errors import BackendError, BackendUnavailable, ConfigError
from omniq.models import (
    EventType,
    Task,
    TaskEvent,
    TaskResult,
    TaskStatus,
    new_task_id,
    seconds_from_now,
    utcnow,
)
from omniq.serialization import encode_event, encode_task

from .tech_redis import HOST, PORT, unavailable

SERVER = shutil.which("redis-server")


def _require(reason: str | None) -> None:
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Redis is required in CI: {reason}")
        pytest.skip(reason)


def run(body: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout))


def task(queue: str = "default", **kw: Any) -> Task:
    return Task(func="omniq.examples:add", args=(1, 2), queue=queue, **kw)


def _drop_keys(port: int, prefix: str, password: str | None = None) -> None:
    client = redis.Redis(host=HOST, port=port, password=password, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A fresh key prefix on the shared server, removed afterwards."""
    _require(unavailable())
    name = "rt" + uuid.uuid4().hex[:10]
    yield name
    _drop_keys(PORT, name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of our own on a spare port, so it can be killed and restarted."""

    def __init__(self, tmp_path: Path, password: str | None = None) -> None:
        self.port = _free_port()
        self.password = password
        self.dir = tmp_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert SERVER
        args = [SERVER, "--port", str(self.port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--dir", str(self.dir)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host=HOST, port=self.port, password=self.password,
                             socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("private redis-server did not start") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def admin(self) -> Any:
        return redis.Redis(host=HOST, port=self.port, password=self.password, socket_timeout=5)


@pytest.fixture
def private(tmp_path: Path) -> Iterator[PrivateRedis]:
    _require(None if SERVER else "redis-server binary not found")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_auth(tmp_path: Path) -> Iterator[PrivateRedis]:
    _require(None if SERVER else "redis-server binary not found")
    server = PrivateRedis(tmp_path, password="s3cret-Pw-917")
    server.start()
    yield server
    server.stop()


# --- configuration ----------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a b", "{app}", "app:omniq", "app*", "-app", "é", "x" * 65])
def test_bad_prefix_is_rejected_at_construction(bad: str) -> None:
    with pytest.raises(ConfigError, match="prefix"):
        RedisQueue(prefix=bad)


def test_constructors_never_connect() -> None:
    for cls in (RedisQueue, RedisResultStorage, RedisEventStorage):
        cls(host="no-such-host.invalid", port=1, password="pw")


def test_create_maps_settings_and_rejects_unknown_ones() -> None:
    store = create("results", {"url": "redis://127.0.0.1:6379/2", "prefix": "app1",
                               "options": {"socket_timeout": 2}})
    assert isinstance(store, RedisResultStorage) and store.prefix == "app1"
    events = create("events", {"host": "h", "port": 7000, "options": {"stream_maxlen": 10}})
    assert isinstance(events, RedisEventStorage)
    with pytest.raises(ConfigError, match="path"):
        create("queue", {"path": "/tmp/x.db"})
    with pytest.raises(ConfigError, match="no_such_option"):
        create("queue", {"options": {"no_such_option": 1}})
    with pytest.raises(ConfigError, match="redis://"):
        create("queue", {"url": "http://127.0.0.1:6379"})
    with pytest.raises(ConfigError, match="stream_maxlen"):
        RedisEventStorage(options={"stream_maxlen": 0})


def test_tls_flag_turns_a_redis_url_into_rediss() -> None:
    store = RedisQueue(url="redis://127.0.0.1:6380/0", tls=True)
    assert store._conn.url is not None and store._conn.url.startswith("rediss://")


def test_repr_shows_no_password() -> None:
    store = RedisQueue(url="redis://u:hunter2-secret@127.0.0.1:6379/0")
    assert "hunter2" not in repr(store) and "127.0.0.1:6379" in repr(store)


# --- URLs, auth and unreachable servers ----------------------------------------


def test_url_forms_reach_the_same_data(prefix: str) -> None:
    async def body() -> None:
        by_host = RedisQueue(host=HOST, port=PORT, db=0, prefix=prefix)
        by_url = RedisQueue(url=f"redis://{HOST}:{PORT}/0", prefix=prefix)
        async with by_host, by_url:
            t = await by_host.enqueue(task())
            got = await by_url.get_task(t)
            assert got is not None and got.id == t

    run(body)


def test_password_and_acl_user(private_auth: PrivateRedis) -> None:
    admin = private_auth.admin()
    admin.acl_setuser("alice", enabled=True, passwords=["+alice-pw-55"], keys=["*"],
                      channels=["*"], commands=["+@all"])
    admin.close()
    port, pw = private_auth.port, private_auth.password

    async def body() -> None:
        stores = [
            RedisResultStorage(host=HOST, port=port, password=pw, prefix="a"),
            RedisResultStorage(url=f"redis://:{pw}@{HOST}:{port}/0", prefix="a"),
            RedisResultStorage(url=f"redis://alice:alice-pw-55@{HOST}:{port}/0", prefix="a"),
            RedisResultStorage(host=HOST, port=port, username="alice", password="alice-pw-55",
                               prefix="a"),
        ]
        r = TaskResult(task_id=new_task_id(), status=TaskStatus.COMPLETED, value=7)
        await stores[0].open()
        await stores[0].store(r)
        for store in stores:
            async with store:
                assert await store.get(r.task_id) == r

    run(body)


@pytest.mark.parametrize("how", ["kwargs", "url", "acl-user", "missing"])
def test_wrong_password_is_one_line_without_the_secret(
    private_auth: PrivateRedis, how: str
) -> None:
    port = private_auth.port
    wrong = "Wr0ng-Secret-4242"
    store = {
        "kwargs": lambda: RedisQueue(host=HOST, port=port, password=wrong),
        "url": lambda: RedisQueue(url=f"redis://:{wrong}@{HOST}:{port}/0"),
        "acl-user": lambda: RedisQueue(url=f"redis://bob:{wrong}@{HOST}:{port}/0"),
        "missing": lambda: RedisQueue(host=HOST, port=port),
    }[how]()

    async def body() -> None:
        with pytest.raises(BackendUnavailable) as info:
            await store.open()
        message = str(info.value)
        assert f"{HOST}:{port}" in message
        assert wrong not in message and private_auth.password not in message
        assert "\n" not in message
        await store.close()

    run(body)


def test_unreachable_port_is_backend_unavailable() -> None:
    port = _free_port()  # nothing listens there

    async def body() -> None:
        for store in (RedisQueue(host=HOST, port=port),
                      RedisResultStorage(url=f"redis://:pw-xyz-1@{HOST}:{port}/0"),
                      RedisEventStorage(host=HOST, port=port)):
            with pytest.raises(BackendUnavailable) as info:
                await store.open()
            assert f"{HOST}:{port}" in str(info.value)
            assert "pw-xyz-1" not in str(info.value) and "\n" not in str(info.value)
            await store.close()
        q = RedisQueue(host=HOST, port=port)  # never opened: the first call connects
        with pytest.raises(BackendUnavailable):
            await q.enqueue(task())
        await q.close()

    run(body)


# --- prefixes and layout ---------------------------------------------------------


def test_two_prefixes_are_isolated(prefix: str) -> None:
    other = prefix + "b"

    async def body() -> None:
        qa, qb = RedisQueue(host=HOST, port=PORT, prefix=prefix), RedisQueue(prefix=other)
        ra, rb = RedisResultStorage(prefix=prefix), RedisResultStorage(prefix=other)
        ea, eb = RedisEventStorage(prefix=prefix), RedisEventStorage(prefix=other)
        for s in (qa, qb, ra, rb, ea, eb):
            await s.open()
        t = await qa.enqueue(task(unique_key="same"))
        assert await qb.enqueue(task(unique_key="same")) != t
        d = await qb.dequeue(["default"], 30, 0)
        assert d is not None and d.task.id != t
        assert await qb.dequeue(["default"], 30, 0) is None
        r = TaskResult(task_id=t, status=TaskStatus.COMPLETED, value=1)
        await ra.store(r)
        assert await rb.get(t) is None and await ra.get(t) == r
        await ea.append(TaskEvent(task_id=t, event_type=EventType.ENQUEUED))
        assert await eb.get(t) == [] and await eb.last_cursor() is None
        assert len(await ea.get(t)) == 1
        for s in (qa, qb, ra, rb, ea, eb):
            await s.close()

    try:
        run(body)
    finally:
        _drop_keys(PORT, other)


def test_result_key_gets_a_ttl(prefix: str) -> None:
    async def body() -> None:
        async with RedisResultStorage(host=HOST, port=PORT, prefix=prefix) as s:
            timed = TaskResult(task_id=new_task_id(), status=TaskStatus.COMPLETED,
                               expires_at=seconds_from_now(60))
            forever = TaskResult(task_id=new_task_id(), status=TaskStatus.COMPLETED)
            await s.store(timed)
            await s.store(forever)

        admin = redis.Redis(host=HOST, port=PORT)
        assert 50_000 < admin.pttl(f"{prefix}:r:{timed.task_id}") <= 60_000
        assert admin.pttl(f"{prefix}:r:{forever.task_id}") == -1
        admin.close()

    run(body)


def test_global_event_stream_is_capped(prefix: str) -> None:
    async def body() -> None:
        async with RedisEventStorage(prefix=prefix, options={"stream_maxlen": 50}) as s:
            tid = new_task_id()
            await s.append_many([TaskEvent(task_id=tid, event_type=EventType.RETRIED,
                                           attempt=i) for i in range(1200)])
            rows = await s.read(None, 5000)
            # MAXLEN ~ trims whole stream nodes (100 entries each by default).
            assert 50 <= len(rows) < 300
            assert rows[-1][1].attempt == 1199
            assert len(await s.get(tid)) == 1200  # the per-task list is not capped

    run(body)


def test_event_record_gets_a_ttl_and_cleanup_keeps_newer_events(prefix: str) -> None:
    async def body() -> None:
        async with RedisEventStorage(prefix=prefix, event_ttl=3600) as s:
            tid = new_task_id()
            old = TaskEvent(task_id=tid, event_type=EventType.ENQUEUED,
                            timestamp=utcnow() - timedelta(days=3))
            new = TaskEvent(task_id=tid, event_type=EventType.STARTED)
            await s.append_many([old, new])
            admin = redis.Redis(host=HOST, port=PORT)
            assert 3_500_000 < admin.pttl(f"{prefix}:t:{tid}") <= 3_600_000
            assert await s.cleanup(utcnow() - timedelta(days=1)) == 1
            assert await s.get(tid) == [new]
            assert 3_500_000 < admin.pttl(f"{prefix}:t:{tid}") <= 3_600_000
            assert [e for _, e in await s.read(None, 10)] == [new]
            admin.close()

    run(body)


def test_invalid_cursor_is_a_value_error(prefix: str) -> None:
    async def body() -> None:
        async with RedisEventStorage(prefix=prefix) as s:
            with pytest.raises(ValueError, match="cursor"):
                await s.read("not-a-cursor", 10)

    run(body)


# --- pipelining -----------------------------------------------------------------


def test_concurrent_calls_share_round_trips_and_keep_their_own_replies(prefix: str) -> None:
    async def body() -> None:
        async with RedisQueue(prefix=prefix) as q:
            tasks = [task(priority=i % 3) for i in range(300)]
            ids = await asyncio.gather(*(q.enqueue(t) for t in tasks))
            assert ids == [t.id for t in tasks]
            got = await asyncio.gather(*(q.get_task(t.id) for t in tasks))
            assert got == tasks
            # One failing command does not spoil the others of its pipeline.
            results = await asyncio.gather(
                q._conn.call("INCR", f"{prefix}:t:{tasks[0].id}"),  # a hash: WRONGTYPE
                q.get_task(tasks[1].id),
                return_exceptions=True,
            )
            assert isinstance(results[0], redis.ResponseError)
            assert results[1] == tasks[1]
            (stats,) = await q.stats()
            assert stats.queued == 300

    run(body)


def test_stores_share_a_client_and_closing_one_keeps_the_other(prefix: str) -> None:
    async def body() -> None:
        q = RedisQueue(host=HOST, port=PORT, prefix=prefix)
        r = RedisResultStorage(host=HOST, port=PORT, prefix=prefix)
        await q.open()
        await r.open()
        assert q._conn.client() is r._conn.client()
        await q.close()
        await q.close()  # idempotent
        res = TaskResult(task_id=new_task_id(), status=TaskStatus.COMPLETED, value=1)
        await r.store(res)
        assert await r.get(res.task_id) == res
        assert await q.get_task(new_task_id()) is None  # a closed store reopens lazily
        await q.close()
        await r.close()

    run(body)


# --- restarts, forks, loops -------------------------------------------------------


def test_stores_recover_after_a_server_restart(private: PrivateRedis) -> None:
    port = private.port

    async def body() -> None:
        q = RedisQueue(host=HOST, port=port, prefix="rc")
        r = RedisResultStorage(host=HOST, port=port, prefix="rc")
        e = RedisEventStorage(host=HOST, port=port, prefix="rc")
        for s in (q, r, e):
            await s.open()
        await q.enqueue(task())
        private.stop()
        outage: list[Awaitable[Any]] = [
            q.enqueue(task()), q.dequeue(["default"], 30, 0), q.stats(),
            r.get(new_task_id()), r.wait(new_task_id(), 1),
            r.store(TaskResult(task_id=new_task_id(), status=TaskStatus.COMPLETED)),
            e.append(TaskEvent(task_id=new_task_id(), event_type=EventType.ENQUEUED)),
            e.read(None, 10), e.wait_new(None, 0.5),
        ]
        for call in outage:
            with pytest.raises(BackendUnavailable) as info:
                await call
            assert f"{HOST}:{port}" in str(info.value)
        private.start()  # empty again: no persistence, no cached scripts
        t = await q.enqueue(task())
        d = await q.dequeue(["default"], 30, 1)
        assert d is not None and d.task.id == t
        res = TaskResult(task_id=t, status=TaskStatus.COMPLETED, value="back")
        waiter = asyncio.create_task(r.wait(t, 10))
        await asyncio.sleep(0.1)
        await r.store(res)
        assert await asyncio.wait_for(waiter, 8) == res
        await e.append(TaskEvent(task_id=t, event_type=EventType.COMPLETED))
        assert [ev.event_type for ev in await e.get(t)] == [EventType.COMPLETED]
        for s in (q, r, e):
            await s.close()

    run(body)


def test_blocked_waits_fail_cleanly_when_the_server_dies(private: PrivateRedis) -> None:
    port = private.port

    async def body() -> None:
        q = RedisQueue(host=HOST, port=port, prefix="bw")
        r = RedisResultStorage(host=HOST, port=port, prefix="bw")
        e = RedisEventStorage(host=HOST, port=port, prefix="bw")
        for s in (q, r, e):
            await s.open()
        waiters = [
            asyncio.create_task(q.dequeue(["default"], 30, 20)),
            asyncio.create_task(r.wait(new_task_id(), 20)),
            asyncio.create_task(e.wait_new(await e.last_cursor(), 20)),
        ]
        await asyncio.sleep(0.3)
        private.stop()
        for waiter in waiters:
            with pytest.raises(BackendUnavailable):
                await asyncio.wait_for(waiter, 15)
        for s in (q, r, e):
            await s.close()

    run(body)


def test_scripts_are_reloaded_after_script_flush(private: PrivateRedis) -> None:
    async def body() -> None:
        async with RedisQueue(host=HOST, port=private.port, prefix="sf") as q:
            await q.enqueue(task())
            admin = private.admin()
            admin.script_flush()
            admin.close()
            # Several at once: the reload also works inside a pipeline.
            await asyncio.gather(*(q.enqueue(task()) for _ in range(5)))
            (stats,) = await q.stats()
            assert stats.queued == 6

    run(body)


def test_store_survives_a_new_event_loop(prefix: str) -> None:
    q = RedisQueue(prefix=prefix)
    t = task()
    asyncio.run(q.open())
    asyncio.run(q.enqueue(t))  # the first loop's sockets are gone: reconnect

    async def second() -> None:
        got = await q.get_task(t.id)
        assert got == t
        await q.close()

    run(second)


def _child_enqueue(q: RedisQueue, t: Task) -> None:
    async def body() -> None:
        await q.enqueue(t)
        await q.close()

    asyncio.run(body())


def test_store_survives_a_fork(prefix: str) -> None:
    q = RedisQueue(prefix=prefix)
    t = task()

    async def parent() -> None:
        await q.open()
        proc = multiprocessing.get_context("fork").Process(target=_child_enqueue, args=(q, t))
        proc.start()
        await asyncio.get_running_loop().run_in_executor(None, proc.join, 20)
        assert proc.exitcode == 0
        assert await q.get_task(t.id) == t  # the parent's connections still work
        await q.close()

    run(parent)


def test_server_errors_become_backend_error(prefix: str) -> None:
    async def body() -> None:
        async with RedisEventStorage(prefix=prefix) as s:
            admin = redis.Redis(host=HOST, port=PORT)
            admin.set(f"{prefix}:e:all", "not a stream")
            admin.close()
            with pytest.raises(BackendError) as info:
                await s.read(None, 10)
            assert not isinstance(info.value, BackendUnavailable)
            assert "WRONGTYPE" in str(info.value)

    run(body)


# --- issue 8: sent twice, one effect; older data keeps working ------------------------


def test_redis_py_never_resends_and_its_retry_options_are_refused() -> None:
    store = RedisQueue(host=HOST, port=PORT)
    assert store._conn._kwargs["retry"].get_retries() == 0
    for option in ("retry", "retry_on_error", "retry_on_timeout"):
        with pytest.raises(ConfigError, match=option):
            create("queue", {"options": {option: True}})


def test_a_settlement_sent_again_finds_its_own_work_done(prefix: str) -> None:
    async def body() -> None:
        async with RedisQueue(prefix=prefix) as q:
            await q.enqueue(task())
            d = await q.dequeue(["default"], 30, 0)
            assert d is not None
            assert await q.retry(d, 60) is True
            assert await q.retry(d, 60) is True  # same token, same work: once
            (stats,) = await q.stats()
            assert (stats.scheduled, stats.running) == (1, 0)
            await q.enqueue(t := task(queue="dl"))
            dl = await q.dequeue(["dl"], 30, 0)
            assert dl is not None
            assert await q.ack(dl, failed=True) is True
            assert await q.ack(dl, failed=True) is True
            assert await q.ack(dl) is False  # a different settlement: not this token's
            await q.enqueue(t)  # queued again: the old token is void
            assert await q.ack(dl, failed=True) is False

    run(body)


def test_a_result_sent_again_is_announced_once(prefix: str) -> None:
    async def body() -> None:
        async with RedisResultStorage(prefix=prefix) as r:
            res = TaskResult(task_id=new_task_id(), status=TaskStatus.COMPLETED, value=1,
                             expires_at=seconds_from_now(60))
            channel = f"{prefix}:r:{res.task_id}"
            pubsub = r._redis().pubsub()
            await pubsub.subscribe(channel)
            assert await r.store(res) is True
            assert await r.store(res) is True  # the same bytes: this write, sent again
            seen = []
            while (msg := await pubsub.get_message(timeout=0.5)) is not None:
                seen.append(msg["type"])
            assert seen.count("message") == 1
            await pubsub.aclose()

    run(body)


def test_unique_keys_of_the_old_hash_layout_are_honoured_and_moved(prefix: str) -> None:
    admin = redis.Redis(host=HOST, port=PORT)

    def as_before_issue_8(key: str, task_id: str) -> None:
        """Where an older OmniQ kept the key: a field of the P:unique hash."""
        admin.delete(f"{prefix}:u:{key}")
        admin.hset(f"{prefix}:unique", key, task_id)

    async def body() -> None:
        async with RedisQueue(prefix=prefix) as q:
            old = await q.enqueue(task(unique_key="k1"))
            as_before_issue_8("k1", old)
            assert await q.enqueue(task(unique_key="k1")) == old
            assert admin.hget(f"{prefix}:unique", "k1") is None  # moved on first sight
            assert admin.get(f"{prefix}:u:k1") == old.encode()
            d = await q.dequeue(["default"], 30, 0)
            assert d is not None and await q.ack(d) is True
            fresh = task(unique_key="k1")
            assert await q.enqueue(fresh) == fresh.id

            other = await q.enqueue(task(queue="o", unique_key="k2"))
            as_before_issue_8("k2", other)
            d = await q.dequeue(["o"], 30, 0)
            assert d is not None and await q.ack(d) is True  # frees the old entry
            assert admin.hget(f"{prefix}:unique", "k2") is None
            assert await q.enqueue(t := task(unique_key="k2")) == t.id
        admin.close()

    run(body)


def test_events_written_before_ids_still_read_and_take_new_ones(prefix: str) -> None:
    admin = redis.Redis(host=HOST, port=PORT)
    tid = new_task_id()
    # An event as an older OmniQ stored it: no "v", no "id".
    old = (b'{"task_id":"%s","event_type":"enqueued","timestamp":1700000000.5,"attempt":0,'
           b'"worker_id":null,"queue":"default","details":{}}' % tid.encode())
    gid = admin.xadd(f"{prefix}:e:all", {"d": old})
    admin.rpush(f"{prefix}:et:{tid}", b"1700000000500 " + gid + b" " + old)
    admin.zadd(f"{prefix}:e:index", {tid: 1700000000500})

    async def body() -> None:
        async with RedisEventStorage(prefix=prefix) as e:
            (legacy,) = await e.get(tid)
            assert legacy.event_type == EventType.ENQUEUED and legacy.id.startswith("legacy-")
            assert [x.id for x in await e.get(tid)] == [legacy.id]  # stable
            new = TaskEvent(task_id=tid, event_type=EventType.STARTED, attempt=1)
            await e.append(new)
            await e.append(new)
            assert [x.id for x in await e.get(tid)] == [legacy.id, new.id]
            assert [x.id for _, x in await e.read(None, 10)] == [legacy.id, new.id]
        admin.close()

    run(body)


def test_a_queued_task_keeps_its_record_while_its_events_come_and_go(prefix: str) -> None:
    async def body() -> None:
        b = RedisBackend(RedisSettings(prefix=prefix, options={"event_ttl": 3600}))
        q, e = b.queue(), b.events()
        async with q, e:
            admin = redis.Redis(host=HOST, port=PORT)
            t = task(queue="rec")
            await e.append(TaskEvent(task_id=t.id, event_type=EventType.ENQUEUED))
            assert admin.pttl(f"{prefix}:t:{t.id}") > 0  # events alone: a TTL
            await q.enqueue(t)
            assert admin.pttl(f"{prefix}:t:{t.id}") == -1  # a queued task never expires
            await e.append(TaskEvent(task_id=t.id, event_type=EventType.RETRIED))
            assert admin.pttl(f"{prefix}:t:{t.id}") == -1
            d = await q.dequeue(["rec"], 30, 0)
            assert d is not None and await q.ack(d) is True
            assert 3_500_000 < admin.pttl(f"{prefix}:t:{t.id}") <= 3_600_000
            assert admin.hget(f"{prefix}:t:{t.id}", "d") == b""  # its payload went
            assert len(await e.get(t.id)) == 2 and await q.get_task(t.id) is None
            admin.close()

    run(body)


def test_tasks_queued_before_issue_10_are_moved_and_run(prefix: str) -> None:
    """The layout before issue 10: zsets :ready (a 16-hex sequence before the id),
    :delayed and :leases per queue, a list of events per task. Opening a store moves
    the queued tasks; their old events are still read and cleaned up."""
    admin = redis.Redis(host=HOST, port=PORT)
    ready, later, running = task(queue="old"), task(queue="old"), task(queue="old")
    admin.sadd(f"{prefix}:queues", "old")
    for t, state in ((ready, "w"), (later, "s"), (running, "r")):
        admin.hset(f"{prefix}:t:{t.id}", mapping={
            "d": encode_task(t), "q": "old", "p": 0, "a": 1 if state == "r" else 0,
            "s": state, "m": "0000000000000001" + t.id, "t": "tok" if state == "r" else "",
            "u": "", "ut": 0})
    admin.zadd(f"{prefix}:q:old:ready", {"0000000000000001" + ready.id: 0})
    admin.zadd(f"{prefix}:q:old:delayed", {later.id: int(time.time() * 1000) + 600_000})
    admin.zadd(f"{prefix}:q:old:leases", {running.id: int(time.time() * 1000) - 1})
    admin.rpush(f"{prefix}:q:old:wake", "1")
    old_event = TaskEvent(task_id=ready.id, event_type=EventType.ENQUEUED,
                          timestamp=utcnow() - timedelta(days=3))
    gid = admin.xadd(f"{prefix}:e:all", {"d": encode_event(old_event)})
    ts = int(old_event.timestamp.timestamp() * 1000)
    admin.rpush(f"{prefix}:et:{ready.id}", f"{ts} ".encode() + gid + b" " +
                encode_event(old_event))
    admin.zadd(f"{prefix}:e:index", {ready.id: ts})

    async def body() -> None:
        async with RedisQueue(prefix=prefix) as q, RedisEventStorage(prefix=prefix) as e:
            assert admin.get(f"{prefix}:layout") == b"2"
            assert not admin.exists(f"{prefix}:q:old:ready", f"{prefix}:q:old:wake")
            (stats,) = await q.stats()
            assert (stats.queued, stats.scheduled, stats.running) == (1, 1, 1)
            got = {d.task.id: d for d in await q.dequeue_many(["old"], 30, 0, 5)}
            assert set(got) == {ready.id, running.id}  # the expired lease ran out
            assert got[running.id].attempt == 2
            assert await e.get(ready.id) == [old_event]
            assert await e.cleanup(utcnow() - timedelta(days=1)) >= 1
            assert await e.get(ready.id) == []

    run(body)
    admin.close()


def test_an_event_id_inside_details_is_not_mistaken_for_a_stored_event(prefix: str) -> None:
    async def body() -> None:
        async with RedisEventStorage(prefix=prefix) as e:
            tid = new_task_id()
            later = TaskEvent(task_id=tid, event_type=EventType.COMPLETED)
            quoting = TaskEvent(task_id=tid, event_type=EventType.STARTED,
                                details={"note": f'"id":"{later.id}"'})
            await e.append_many([quoting, later])
            assert await e.get(tid) == [quoting, later]

    run(body)


def _child_asks(q: RedisQueue) -> None:
    os._exit(0 if q._claims.begin(30)[2] == [] else 1)


def test_claims_left_unsettled_in_a_parent_are_not_asked_for_in_a_forked_child() -> None:
    q = RedisQueue(prefix="unused")
    q._claims.failed(("c1", time.monotonic() + 30), [])
    proc = multiprocessing.get_context("fork").Process(target=_child_asks, args=(q,))
    proc.start()
    proc.join(20)
    assert proc.exitcode == 0  # the child's claims are its own
    _, _, asked = q._claims.begin(30)
    assert [cid for cid, _ in asked] == ["c1"]


# Redis commands (INFO commandstats: EVALSHA and the calls inside it) per operation,
# one round trip each. Issue 10 counted them before (in brackets) and after: the
# task's events moved into its record, claims stopped polling (no ZRANGEBYSCORE or
# TIME on a claim that finds work), and submit, claim and finish became one script
# each: per task, submit + fused claim + finish = 19 commands (was 17 + 23 + 23 = 63
# on the generic path).
BUDGET = {
    "submit": 4,  # [17: enqueue 8 + ENQUEUED 8 + its client's 1]
    "submit unique": 10,
    "enqueue": 5,  # [8]
    "claim with STARTED": 6,  # [claim 9 + STARTED 6]
    "claim": 6,  # [9]
    "extend": 4,  # [4]
    "finish": 9,  # [store 5 + event 6 + ack 4]
    "ack unique": 7,  # [6]
    "ack": 5,  # [4]
    "claim empty": 3,  # [8]
    "retry": 5,  # [8]
    "store": 4,  # [5]
    "store lost race": 3,  # [3]
    "append first of task": 5,  # [8]
    "append next of task": 5,  # [6]
    # Issue 11 (new; a task waiting for others is claimed without STARTED, and then
    # handed back, not counted, until they are done):
    "claim waiting for others": 6,  # TIME where the STARTED's XADD was
    "release": 5,  # [5]
    "release later": 5,
    "get_many": 1,  # MGET (500 keys a command, the commands sent together)
    "failed of a queue": 4,  # ZREVRANGEBYSCORE, then HMGET per dead letter on the page (2)
    "failed": 9,  # SMEMBERS, a ZREVRANGEBYSCORE per queue (4 here), 3 HMGET
    # (a full page that ends inside a millisecond shared by more dead letters: + a
    # ZREVRANGEBYSCORE per queue, for that whole group)
    "forget": 5,  # HMGET ZREM HSET PEXPIRE per dead letter
    "put_record": 1,  # HSET
    "get_record": 1,  # HGET
    "list_records": 1,  # HGETALL: what a busy worker asks each second (cancel requests)
    "delete_record": 1,  # HDEL
}


def test_commands_per_operation(tmp_path: Path) -> None:
    from omniq.backends.redis import _SOURCES, RedisBackend, RedisSettings
    from tests.servers import private_redis

    with private_redis(persistent=False) as server:
        admin = redis.Redis(host=HOST, port=server.port)
        for source in _SOURCES.values():
            admin.script_load(source)
        counts: dict[str, int] = {}

        async def count(name: str, call: Awaitable[Any]) -> Any:
            admin.config_resetstat()
            got = await call
            stats = admin.info("commandstats")
            counts[name] = sum(v["calls"] for k, v in stats.items()
                               if k not in ("cmdstat_config|resetstat", "cmdstat_info"))
            assert stats.get("cmdstat_evalsha", {"calls": 0})["calls"] <= 1
            return got

        async def body() -> None:
            b = RedisBackend(RedisSettings(host=HOST, port=server.port, prefix="cnt"))
            q, r, e = b.queue(), b.results(), b.events()
            for s in (q, r, e):
                await s.open()
            # Once per process: the queue's name is registered, the first claim asks
            # where the wake-up stream stands, and a sweep of due timers runs at most
            # once a second.
            await q.enqueue(task())
            await b.claim(["default"], 30, 0, 1, "w0")
            t, tu = task(), task(unique_key="u1")
            await count("submit", b.submit(t, enqueued(t)))
            await count("submit unique", b.submit(tu, enqueued(tu)))
            await count("enqueue", q.enqueue(task()))
            (d,) = await count("claim with STARTED", b.claim(["default"], 30, 0, 1, "w1"))
            du = await count("claim", q.dequeue(["default"], 30, 0))
            assert du.task.id == tu.id
            await count("extend", q.extend(d, 30))
            res, ev = done(d)
            assert await count("finish", b.finish(d, res, ev, failed=False)) is True
            await count("ack unique", q.ack(du))
            await count("ack", q.ack(await q.dequeue(["default"], 30, 0)))
            await count("claim empty", q.dequeue(["default"], 30, 0))
            await q.enqueue(t2 := task())
            d2 = await q.dequeue(["default"], 30, 0)
            await count("retry", q.retry(d2, 5))
            res2 = TaskResult(task_id=t2.id, status=TaskStatus.COMPLETED, value=3,
                              expires_at=seconds_from_now(60))
            assert await count("store", r.store(res2)) is True
            late = TaskResult(task_id=t2.id, status=TaskStatus.COMPLETED, value=4)
            assert await count("store lost race", r.store(late)) is False
            t3 = new_task_id()
            await count("append first of task",
                        e.append(TaskEvent(task_id=t3, event_type=EventType.ENQUEUED)))
            await count("append next of task",
                        e.append(TaskEvent(task_id=t3, event_type=EventType.STARTED)))
            await _count_issue_11(count, b)
            for s in (q, r, e):
                await s.close()

        run(body)
        admin.close()
    print(counts)
    assert counts.keys() == BUDGET.keys()
    assert all(counts[name] <= BUDGET[name] for name in BUDGET), counts


async def _count_issue_11(
    count: Callable[[str, Awaitable[Any]], Awaitable[Any]], b: RedisBackend
) -> None:
    q, r = b.queue(), b.results()
    waits = task("dep", after=(new_task_id(),))
    await q.enqueue(waits)
    (d,) = await count("claim waiting for others", b.claim(["dep"], 30, 0, 1, "w1"))
    await count("release later", q.release(d, 5))
    await q.enqueue(task("dep"))
    d = await q.dequeue(["dep"], 30, 0)
    await count("release", q.release(d))
    got = await count("get_many", r.get_many([d.task_id, new_task_id(), new_task_id()]))
    assert got == {}
    for name in ("dl", "dl", "dl2"):
        await q.enqueue(task(name))
        dead = await q.dequeue([name], 30, 0)
        assert await q.ack(dead, failed=True) is True
    page = await count("failed of a queue", q.failed("dl"))
    assert len(page) == 2
    assert len(await count("failed", q.failed(None))) == 3
    assert await count("forget", q.forget([page[0].task.id])) == 1
    await count("put_record", q.put_record("cancel", "a", b"{}"))
    assert await count("get_record", q.get_record("cancel", "a")) == b"{}"
    assert await count("list_records", q.list_records("cancel")) == [("a", b"{}")]
    assert await count("delete_record", q.delete_record("cancel", "a")) is True


def enqueued(t: Task) -> TaskEvent:
    return TaskEvent(t.id, EventType.ENQUEUED, queue=t.queue, details={"func": t.func})


def done(d: Any) -> tuple[TaskResult, TaskEvent]:
    result = TaskResult(d.task_id, TaskStatus.COMPLETED, value=3, attempts=d.attempt,
                        queue=d.task.queue, worker_id="w1", expires_at=seconds_from_now(60))
    event = TaskEvent(d.task_id, EventType.COMPLETED, attempt=d.attempt, worker_id="w1",
                      queue=d.task.queue)
    return result, event
