"""The Redis result and event stores: results as keys announced by Pub/Sub, events in
their task's record and in one capped stream."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc

from omniq.models import TaskEvent, TaskResult
from omniq.serialization import decode_event, decode_result, encode_event, encode_result

from .base import BATCH, RedisStore, guarded, ms, pairs, text

CURSOR_RE = re.compile(r"^\d+-\d+$")
RESULT_SLICE = 5.0  # a result waiter re-reads at least this often (missed notifications)
BLOCK_SLICE = 2.0  # longest single XREAD BLOCK; waits longer than that loop
# Channels nobody waits on any more are unsubscribed together, this long after the
# first of them (or once this many gather): one UNSUBSCRIBE for many waits.
UNSUBSCRIBE_AFTER = 1.0
UNSUBSCRIBE_BATCH = 256


# --- results --------------------------------------------------------------------------


class Subscriber:
    """One Pub/Sub connection shared by every `wait` of a Backend in a process and loop.

    A waiter subscribes, waits for the server's confirmation, then reads the result: a
    store that lands before the confirmation is seen by the read, one after it by the
    notification, which carries the result itself.
    """

    def __init__(self, client: aioredis.Redis, timeout: float | None) -> None:
        self.client = client
        self._timeout = timeout
        self._pubsub = client.pubsub()
        self._boxes: dict[str, set[_Mailbox]] = {}
        self._confirm: dict[str, list[asyncio.Future[None]]] = {}
        self._idle: set[str] = set()  # subscribed, nobody waits: unsubscribed later
        self._flusher: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.broken: BaseException | None = None

    @contextlib.asynccontextmanager
    async def watch(self, channel: str) -> AsyncIterator[_Mailbox]:
        box = _Mailbox()
        waiters = self._boxes.setdefault(channel, set())
        first = not waiters
        waiters.add(box)
        try:
            if first and channel in self._idle:
                self._idle.discard(channel)  # still subscribed (and confirmed)
            elif first:
                await self._subscribe(channel)
            elif self._confirm.get(channel):
                await asyncio.shield(self._confirm[channel][-1])
            yield box
        finally:
            waiters.discard(box)
            if not waiters and self._boxes.get(channel) is waiters:
                del self._boxes[channel]
                if self.broken is None and not self._confirm.get(channel):
                    self._idle.add(channel)
                    self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._idle:
                if len(self._idle) < UNSUBSCRIBE_BATCH:
                    await asyncio.sleep(UNSUBSCRIBE_AFTER)
                batch, self._idle = list(self._idle), set()
                if batch and self.broken is None:
                    with contextlib.suppress(rexc.RedisError, OSError, TimeoutError):
                        async with asyncio.timeout(self._timeout):
                            await self._pubsub.unsubscribe(*batch)
        finally:
            self._flusher = None

    async def _subscribe(self, channel: str) -> None:
        if self.broken is not None:
            raise rexc.ConnectionError(str(self.broken))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending = self._confirm.setdefault(channel, [])
        pending.append(fut)
        try:
            async with asyncio.timeout(self._timeout):
                await self._pubsub.subscribe(channel)
            if self._reader is None:
                self._reader = asyncio.create_task(self._read())
            await asyncio.wait_for(asyncio.shield(fut), 10.0)
        except BaseException:
            if fut in pending:
                pending.remove(fut)
            if not pending and self._confirm.get(channel) is pending:
                del self._confirm[channel]
            raise

    async def _read(self) -> None:
        try:
            while True:
                msg = await self._pubsub.get_message(timeout=RESULT_SLICE)
                if msg:
                    self._dispatch(text(msg["type"]), text(msg["channel"]), msg["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(exc)

    def _dispatch(self, kind: str, channel: str, data: Any) -> None:
        if kind == "subscribe":
            pending = self._confirm.get(channel)
            if pending:
                fut = pending.pop(0)
                if not pending:
                    del self._confirm[channel]
                if not fut.done():
                    fut.set_result(None)
                return
            # A re-subscribe after a reconnect: results may have been missed.
            data = None
        elif kind != "message":
            return
        for box in self._boxes.get(channel, ()):
            box.put(data)

    def _fail(self, exc: BaseException) -> None:
        self.broken = exc
        for pending in self._confirm.values():
            for fut in pending:
                if not fut.done():
                    fut.set_exception(rexc.ConnectionError(str(exc)))
        self._confirm.clear()
        for boxes in self._boxes.values():
            for box in boxes:
                box.put(None)

    async def close(self) -> None:
        for task in (self._reader, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()


class _Mailbox:
    """One waiter's wake-up: the payload of the last notification, if any."""

    __slots__ = ("_data", "_event")

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._data: bytes | None = None

    def put(self, data: bytes | None) -> None:
        self._data = data if isinstance(data, bytes) else self._data
        self._event.set()

    async def take(self, timeout: float) -> bytes | None:
        """Wait up to `timeout`; the payload (None: woken without one, or timed out)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._event.wait()
        self._event.clear()
        data, self._data = self._data, None
        return data


def _fresh(result: TaskResult) -> TaskResult | None:
    return None if result.is_expired() else result


class RedisResultStorage(RedisStore):
    """Results as keys with PEXPIREAT; `wait` is woken by Pub/Sub (a SUBSCRIBE and one
    GET, the UNSUBSCRIBE sent later together with others)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._closing: set[asyncio.Task[None]] = set()

    def _key(self, task_id: str) -> str:
        return f"{self._p}r:{task_id}"

    @guarded
    async def store(self, result: TaskResult) -> bool:
        got = await self._script(
            "result_store", result.task_id, encode_result(result),
            ms(result.finished_at), ms(result.expires_at),
        )
        return bool(got)

    @guarded
    async def get(self, task_id: str) -> TaskResult | None:
        data = await self._conn.call("GET", self._key(task_id))
        return None if data is None else _fresh(decode_result(data))

    @guarded
    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskResult]:
        """MGET, BATCH keys per command, the commands sent together: one round trip."""
        ids = list(dict.fromkeys(task_ids))
        chunks = [ids[i : i + BATCH] for i in range(0, len(ids), BATCH)]
        replies = await asyncio.gather(
            *(self._conn.call("MGET", *map(self._key, chunk)) for chunk in chunks)
        )
        found = {}
        for chunk, values in zip(chunks, replies, strict=True):
            for task_id, data in zip(chunk, values, strict=True):
                result = None if data is None else _fresh(decode_result(data))
                if result is not None:
                    found[task_id] = result
        return found

    @guarded
    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        if timeout is not None and timeout <= 0:
            return await self.get(task_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            result = await self._watch(task_id, deadline)
            if result is not None or (deadline is not None and loop.time() >= deadline):
                return result

    async def _watch(self, task_id: str, deadline: float | None) -> TaskResult | None:
        """Wait on one subscription until the result, the deadline, or a broken link."""
        loop = asyncio.get_running_loop()
        sub = self._subscriber()
        async with sub.watch(self._key(task_id)) as box:
            result = await self.get(task_id)
            while result is None and sub.broken is None:
                pause = RESULT_SLICE if deadline is None else min(RESULT_SLICE,
                                                                  deadline - loop.time())
                if pause <= 0:
                    return None
                data = await box.take(pause)
                result = _fresh(decode_result(data)) if data else await self.get(task_id)
        return result

    def _subscriber(self) -> Subscriber:
        link = self._conn.link()
        sub = link.sub
        if sub is None or sub.broken is not None:
            if sub is not None:  # broken: release its connection in the background
                closing = asyncio.get_running_loop().create_task(sub.close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            sub = link.sub = Subscriber(link.client, self._conn.timeout)
        assert isinstance(sub, Subscriber)
        return sub

    @guarded
    async def delete(self, task_id: str) -> bool:
        return bool(await self._script("result_delete", task_id))

    @guarded
    async def cleanup(self, now: datetime, finished_before: datetime | None = None) -> int:
        total = 0
        before = "" if finished_before is None else str(ms(finished_before))
        while True:
            n = int(await self._script("result_cleanup", BATCH, ms(now), before))
            total += n
            if n < BATCH:
                return total


# --- events ---------------------------------------------------------------------------


class RedisEventStorage(RedisStore):
    """Events in their task's record (field "e:<event id>", the stream id first, so
    a task's events read in stored order) and in one capped stream (cursor = entry id).

    The Backend's options `stream_maxlen` (approximate cap of the stream, default
    1,000,000) and `event_ttl` (seconds a record without a queued task lives after its
    last event, default 30 days; 0 or None keeps it until cleanup) apply.
    """

    @property
    def _stream(self) -> str:
        return f"{self._p}e:all"

    @guarded
    async def append(self, event: TaskEvent) -> None:
        await self._append([event])

    @guarded
    async def append_many(self, events: Sequence[TaskEvent]) -> None:
        for i in range(0, len(events), BATCH):
            await self._append(events[i : i + BATCH])

    async def _append(self, events: Sequence[TaskEvent]) -> None:
        args: list[Any] = []
        for event in events:
            args += (event.task_id, event.id, encode_event(event), ms(event.timestamp))
        if args:
            settings = self.backend.settings
            await self._script("events_append", settings.stream_maxlen,
                               settings.record_ttl_ms, *args)

    @guarded
    async def get(self, task_id: str) -> list[TaskEvent]:
        # The record, and the list of the layout before issue 10: one round trip.
        record, legacy = await asyncio.gather(
            self._conn.call("HGETALL", f"{self._p}t:{task_id}"),
            self._conn.call("LRANGE", f"{self._p}et:{task_id}", 0, -1),
        )
        stored = sorted(
            (_order(value), value.split(b" ", 1)[1])
            for field, value in pairs(record) if field.startswith(b"e:")
        )
        items = [item.split(b" ", 2)[2] for item in legacy]
        return [decode_event(data) for data in items + [data for _, data in stored]]

    @guarded
    async def read(self, after: str | None, limit: int) -> list[tuple[str, TaskEvent]]:
        start = "-" if after is None else "(" + _cursor(after)
        rows = await self._conn.call("XRANGE", self._stream, start, "+", "COUNT", limit)
        return [(text(cid), decode_event(fields[b"d"])) for cid, fields in rows]

    @guarded
    async def latest(self, limit: int, before: str | None = None) -> list[tuple[str, TaskEvent]]:
        if limit <= 0:
            return []
        end = "+" if before is None else "(" + _cursor(before)
        rows = await self._conn.call("XREVRANGE", self._stream, end, "-", "COUNT", limit)
        return [(text(cid), decode_event(fields[b"d"])) for cid, fields in reversed(rows)]

    @guarded
    async def last_cursor(self) -> str | None:
        rows = await self._conn.call("XREVRANGE", self._stream, "+", "-", "COUNT", 1)
        return text(rows[0][0]) if rows else None

    @guarded
    async def wait_new(self, after: str | None, timeout: float) -> None:
        start = "0-0" if after is None else _cursor(after)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            block = int(min(remaining, BLOCK_SLICE) * 1000)
            # XREAD BLOCK 0 would wait forever: a spent timeout is a plain read.
            async with self._conn.deadline(max(block, 0) / 1000):
                rows = await self._redis().xread(
                    {self._stream: start}, count=1, block=block if block > 0 else None
                )
            if rows or block <= 0:
                return

    @guarded
    async def cleanup(self, before: datetime) -> int:
        cutoff = ms(before)
        removed = 0
        while True:  # the lists of the layout before issue 10
            visited, n = await self._script("events_cleanup_legacy", BATCH, cutoff)
            removed += int(n)
            if int(visited) < BATCH:
                break
        start = "-"
        while True:
            visited, n, last = await self._script("events_cleanup", BATCH, cutoff, start)
            removed += int(n)
            if int(visited) < BATCH:
                return removed
            start = "(" + text(last)


def _order(value: bytes) -> tuple[int, int]:
    """The stream id at the start of a stored event ("0" for a first ENQUEUED)."""
    gid = value.split(b" ", 1)[0]
    ms_part, _, seq = gid.partition(b"-")
    return int(ms_part), int(seq or 0)


def _cursor(value: str) -> str:
    if not CURSOR_RE.match(value):
        raise ValueError(f"invalid event cursor {value!r} (expected a Redis stream id)")
    return value
