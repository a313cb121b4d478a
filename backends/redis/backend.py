"""The Redis Backend: one connection for a server+database+prefix, the three roles on
it, and the fused operations (submit, claim, finish), one script call each."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from omniq.backend import forget_shared, shared
from omniq.errors import OmniQError
from omniq.models import Delivery, Task, TaskEvent, TaskResult
from omniq.serialization import encode_event, encode_result
from omniq.storage import EventStorage, ResultStorage, TaskQueue, runs_now, started_event

from .base import guarded, ms
from .connection import Connection, RedisSettings
from .queue import RedisQueue
from .stores import RedisEventStorage, RedisResultStorage

LAYOUT = b"2"  # P:layout; before issue 10 there was none (see upgrade.lua)


def backend_for(settings: RedisSettings) -> RedisBackend:
    """The process's Backend for these settings."""
    return shared(("redis", settings.key), lambda: RedisBackend(settings))


class RedisBackend:
    """All three roles on one Redis connection, with the fused operations of
    omniq.storage.FusedOps.

    Commands per operation (INFO commandstats, EVALSHA included; the test
    test_commands_per_operation keeps them): submit 4 (HSET of the task's record with
    its event, XADD, ZADD), a claim of one task 6 (ZRANGE, HMGET, XADD, HSET, ZADD),
    finish 9 (HMGET, SET NX, ZADD index, PUBLISH, XADD, ZREM, HSET, PEXPIRE). Before
    issue 10: 17 for an enqueue with its event, 23 for a claim with STARTED, 23 for
    result, event and ack. Issue 11's store calls are one round trip each: a release
    (now or later) 5; failed() 1 + a ZREVRANGEBYSCORE per queue (+ SMEMBERS for all
    queues) + an HMGET per dead letter on the page; forget 1 + 4 per dead letter; a
    record call or results.get_many 1.
    """

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.conn = Connection(settings)
        self._p = settings.prefix + ":"
        self._users = 0
        self._layout_checked = False
        self._registered: set[str] = set()
        self._pid = os.getpid()
        self._queue = RedisQueue(backend=self)
        self._results = RedisResultStorage(backend=self)
        self._events = RedisEventStorage(backend=self)

    def __repr__(self) -> str:
        return f"RedisBackend({self.conn.where!r}, prefix={self.settings.prefix!r})"

    def queue(self) -> TaskQueue:
        return self._queue

    def results(self) -> ResultStorage:
        return self._results

    def events(self) -> EventStorage:
        return self._events

    def translate(self, exc: BaseException) -> OmniQError | None:
        return self.conn.translate(exc)

    # --- lifecycle --------------------------------------------------------------------

    async def open_store(self, *, counted: bool = True) -> None:
        """A store opens: one round trip (that also checks the key layout)."""
        layout = await self.conn.call("GET", self._p + "layout")
        if layout != LAYOUT and not self._layout_checked:
            await self._upgrade()
        self._layout_checked = True
        self._users += counted

    async def _upgrade(self) -> None:
        """Move queued tasks of the layout before issue 10 (or mark a new prefix)."""
        while int(await self.conn.script("upgrade", self._p, 500)):
            pass

    async def close_store(self) -> None:
        """A store closes; the last one closes the connection (in this process and loop)."""
        self._users -= 1
        if self._users <= 0:
            self._users = 0
            forget_shared(("redis", self.settings.key))
            await self.conn.close()

    @property
    def in_use(self) -> bool:
        """Whether an opened store still uses the connection."""
        return self._users > 0

    def unregistered(self, queue: str) -> bool:
        """Whether this process has not yet added `queue` to P:queues (what stats and
        purge list): an enqueue does so once per queue and process."""
        if self._pid != os.getpid():
            self._registered, self._pid = set(), os.getpid()
        return queue not in self._registered

    def registered(self, queue: str) -> None:
        self._registered.add(queue)

    # --- fused operations -------------------------------------------------------------

    @guarded
    async def submit(self, task: Task, event: TaskEvent) -> str:
        return await self._queue.put(task, event)

    @guarded
    async def claim(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int, worker_id: str
    ) -> list[Delivery]:
        return await self._queue.take(queues, lease, timeout, limit, worker_id)

    @guarded
    async def finish(
        self, delivery: Delivery, result: TaskResult, event: TaskEvent, *, failed: bool
    ) -> bool:
        got = await self.conn.script(
            "finish", self._p, delivery.task_id, str(delivery.receipt), "1" if failed else "0",
            encode_result(result), ms(result.finished_at), ms(result.expires_at),
            event.id, encode_event(event), self.settings.record_ttl_ms,
            self.settings.stream_maxlen,
        )
        return bool(got)

    async def started_missing(self, got: list[Delivery], flat: list[Any], worker_id: str) -> None:
        """A delivery the script wrote no STARTED for while this process's clock says
        it runs (expiry seen differently, a payload check that passed here): written
        now, under the same id, so a claim found again never stores two."""
        missing = [started_event(d, worker_id) for i, d in enumerate(got)
                   if not int(flat[6 * i + 5]) and runs_now(d)]
        if missing:
            await self._events.append_many(missing)
