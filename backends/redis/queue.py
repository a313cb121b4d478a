"""The Redis task queue: enqueue, claims (batched, with STARTED when fused), leases,
retries and the wait of an idle worker."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from omniq.models import (
    Delivery,
    FailedTask,
    QueueStats,
    Task,
    TaskEvent,
    WorkerInfo,
    check_queue_name,
    check_record_name,
    from_timestamp,
    to_timestamp,
    utcnow,
)
from omniq.serialization import (
    decode_task_or_placeholder,
    decode_worker,
    dumps,
    encode_event,
    encode_task,
    encode_worker,
)

from .base import BATCH, RedisStore, from_ms, guarded, ms, ms_ceil, pairs, text
from .scripts import PRIORITY_LIMIT

BLOCK_SLICE = 2.0  # longest single blocking wait; an idle worker claims again after it
SWEEP_EVERY = 1.0  # while busy, due timers move to ready at least this often (s)
# Claim ids of failed calls that one claim call asks about: concurrent calls (a
# worker's fetchers) each take one, so claims lost in one pipelined request are found
# by the next calls, not one after another.
UNSETTLED_PER_CALL = 1
UNSETTLED_MAX = 256  # kept at most (the oldest go: their leases expire anyway)
WAKE_COUNT = 100  # stream entries one wake-up read takes


class _Claims:
    """The claim ids of one store object's claim calls that got no reply.

    Such a claim may have taken leases on the server: the next claim call names those
    ids first, so their tasks are delivered instead of waiting for the leases to
    expire (whatever queues that call names: a worker's queues do not change). Kept
    per process (a forked child must not pick up its parent's claims) and only while
    their lease could still hold.
    """

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}  # claim id -> monotonic end of its lease
        self._pid = os.getpid()

    def begin(self, lease: float) -> tuple[str, float, list[tuple[str, float]]]:
        """A new claim id, its lease end, and the unsettled ids this call asks about
        (taken out, so concurrent calls never ask about the same one)."""
        if self._pid != os.getpid():
            self._pending, self._pid = {}, os.getpid()
        now = time.monotonic()
        live = [(c, until) for c, until in self._pending.items() if until > now]
        asked, kept = live[:UNSETTLED_PER_CALL], live[UNSETTLED_PER_CALL:]
        self._pending = dict(kept)
        return os.urandom(10).hex(), now + lease, asked

    def failed(self, claim: tuple[str, float], asked: list[tuple[str, float]]) -> None:
        """The call got no reply: its own id and those it asked about stay unsettled."""
        for cid, until in [*asked, claim]:
            self._pending[cid] = until
        while len(self._pending) > UNSETTLED_MAX:
            del self._pending[next(iter(self._pending))]

    def answered(self, asked: list[tuple[str, float]], checked: int) -> None:
        """The server checked the first `checked` ids asked about; the rest stay."""
        for cid, until in asked[checked:]:
            self._pending[cid] = until


@dataclass
class _Drained:
    """What a claim that emptied its queues left for the next one: where the streams
    stood (any entry after that may have made a task ready) and when a timer is due."""

    due_at: float | None  # loop time; None = no timer known


class RedisQueue(RedisStore):
    """Tasks in Redis: one zset per queue (ready by priority and age, then timers) and a
    record per task; claims, leases and retries are single Lua scripts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._claims = _Claims()
        self._cursor: str | None = None  # of P:e:all, for idle waits
        self._wake_cursor: str | None = None  # of P:wake
        self._drained: dict[tuple[str, ...], _Drained] = {}
        self._last_sweep = 0.0

    # --- enqueue ----------------------------------------------------------------------

    @guarded
    async def enqueue(self, task: Task) -> str:
        return await self.put(task, None)

    async def put(self, task: Task, event: TaskEvent | None) -> str:
        """Enqueue `task`, with its ENQUEUED `event` when given, in one script call."""
        check_queue_name(task.queue)
        if abs(task.priority) >= PRIORITY_LIMIT:
            raise ValueError(f"priority {task.priority} is out of range (|p| < 1e14)")
        register = self.backend.unregistered(task.queue)
        got = await self._script(
            "enqueue", task.id, encode_task(task), task.queue, task.priority, ms(task.eta),
            task.unique_key or "", int((task.unique_ttl or 0) * 1000), task.max_retries,
            ms(task.expires_at) or "", event.id if event else "",
            encode_event(event) if event else "", self.backend.settings.stream_maxlen,
            "1" if register else "0", "1" if task.after else "0",
        )
        if register:
            self.backend.registered(task.queue)
        return text(got)

    # --- claims -----------------------------------------------------------------------

    @guarded
    async def dequeue(
        self, queues: Sequence[str], lease: float, timeout: float
    ) -> Delivery | None:
        got = await self.take(queues, lease, timeout, 1, None)
        return got[0] if got else None

    @guarded
    async def dequeue_many(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int
    ) -> list[Delivery]:
        return await self.take(queues, lease, timeout, limit, None)

    async def take(
        self,
        queues: Sequence[str],
        lease: float,
        timeout: float,
        limit: int,
        worker_id: str | None,
    ) -> list[Delivery]:
        """Claim up to `limit` tasks, waiting up to `timeout` for the first; with a
        `worker_id`, each delivery's STARTED is stored by the same script."""
        names = _checked_queues(queues)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        drained = self._drained.pop(names, None)
        if drained is not None and timeout > 0:
            # The last claim took every ready task: wait for news before claiming.
            await self._idle_wait(names, self._pause(deadline, drained.due_at))
        while True:
            got, due = await self._claim(names, lease, limit, worker_id)
            if got:
                return got
            if loop.time() >= deadline:
                return []
            due_at = None if due < 0 else loop.time() + due / 1000
            await self._idle_wait(names, self._pause(deadline, due_at))

    @staticmethod
    def _pause(deadline: float, due_at: float | None) -> float:
        now = asyncio.get_running_loop().time()
        pause = min(deadline - now, BLOCK_SLICE)
        if due_at is not None:
            pause = min(pause, due_at - now + 0.002)
        return pause

    async def _claim(
        self, names: tuple[str, ...], lease: float, limit: int, worker_id: str | None
    ) -> tuple[list[Delivery], int]:
        """One claim script: the deliveries, and ms until the first timer (-1: none)."""
        cid, until, asked = self._claims.begin(lease)
        now = time.monotonic()
        refind = [x for c, u in asked for x in (c, int(max(0.0, lease - (u - now)) * 1000))]
        sweep = now - self._last_sweep >= SWEEP_EVERY
        settings = self.backend.settings
        try:
            reply = await self._script(
                "claim", int(lease * 1000), cid, dumps(worker_id),
                dumps(to_timestamp(utcnow())), int(time.time() * 1000), limit,
                "1" if sweep else "0", "1" if self._wake_cursor is None else "0",
                settings.stream_maxlen, "0" if worker_id is None else "1",
                settings.record_ttl_ms, len(asked), *refind, *names,
            )
        except BaseException:  # no reply: the server may have taken leases for us
            self._claims.failed((cid, until), asked)
            raise
        flat, checked, more, due, cursor, wake_cursor = reply
        self._claims.answered(asked, int(checked))
        if sweep:
            self._last_sweep = now
        self._note_cursors(cursor, wake_cursor)
        got = [_delivery(flat[i : i + 6]) for i in range(0, len(flat), 6)]
        if got and not int(more):
            due_at = None if int(due) < 0 else asyncio.get_running_loop().time() + int(due) / 1000
            self._drained[names] = _Drained(due_at)
        if worker_id is not None:
            await self.backend.started_missing(got, flat, worker_id)
        return got, int(due)

    def _note_cursors(self, cursor: bytes | str, wake_cursor: bytes | str) -> None:
        if cursor:
            self._cursor = text(cursor)
        if wake_cursor:
            self._wake_cursor = text(wake_cursor)

    async def _idle_wait(self, names: tuple[str, ...], pause: float) -> None:
        """Block until an entry that may have made a task of `names` ready (an
        ENQUEUED of one of them, a wake-up) or `pause` passes. Other events advance
        the cursors; after two such reads in a row, reads are spaced 20 ms apart, so a
        busy event stream costs an idle worker at most ~50 reads a second."""
        loop = asyncio.get_running_loop()
        end = loop.time() + pause
        wanted = {n.encode() for n in names}
        quiet = 0
        while (remaining := end - loop.time()) >= 0.01:
            streams: dict[Any, Any] = {f"{self._p}e:all": self._cursor or "$",
                                       f"{self._p}wake": self._wake_cursor or "$"}
            async with self._conn.deadline(remaining):
                rows = await self._redis().xread(
                    streams, count=WAKE_COUNT, block=max(1, int(remaining * 1000))
                )
            if not rows:
                return
            if self._read_news(rows, wanted):
                return
            quiet += 1
            if quiet >= 2:
                await asyncio.sleep(min(0.02, max(0.0, end - loop.time())))
        if remaining > 0:
            await asyncio.sleep(remaining)

    def _read_news(self, rows: Any, wanted: set[bytes]) -> bool:
        news = False
        for stream, entries in rows:
            if not entries:
                continue
            last = text(entries[-1][0])
            if text(stream).endswith(":wake"):
                self._wake_cursor = last
            else:
                self._cursor = last
            news = news or any(fields.get(b"w") in wanted for _, fields in entries)
        return news

    # --- settlements ------------------------------------------------------------------

    @guarded
    async def ack(self, delivery: Delivery, *, failed: bool = False) -> bool:
        got = await self._script("ack", delivery.task_id, str(delivery.receipt),
                                 "1" if failed else "0", self.backend.settings.record_ttl_ms)
        return bool(got)

    @guarded
    async def retry(self, delivery: Delivery, delay: float) -> bool:
        got = await self._script("retry", delivery.task_id, str(delivery.receipt),
                                 int(max(0.0, delay) * 1000))
        return bool(got)

    @guarded
    async def release(self, delivery: Delivery, delay: float = 0.0) -> None:
        await self._script("release", delivery.task_id, str(delivery.receipt),
                           int(max(0.0, delay) * 1000))

    @guarded
    async def extend(self, delivery: Delivery, lease: float) -> bool:
        got = await self._script("extend", delivery.task_id, str(delivery.receipt),
                                 int(lease * 1000))
        return bool(got)

    @guarded
    async def cancel(self, task_id: str) -> bool:
        return bool(await self._script("cancel", task_id, self.backend.settings.record_ttl_ms))

    # --- reads and admin --------------------------------------------------------------

    @guarded
    async def get_task(self, task_id: str) -> Task | None:
        data, queue, state = await self._conn.call("HMGET", f"{self._p}t:{task_id}",
                                                   "d", "q", "s")
        if not data or state == b"d":
            return None
        task, _ = decode_task_or_placeholder(data, task_id, text(queue or "default"))
        return task

    @guarded
    async def stats(self) -> list[QueueStats]:
        flat = await self._script("stats")
        out = []
        for i in range(0, len(flat), 6):
            queued, scheduled, running, failed, oldest = (int(n) for n in flat[i + 1 : i + 6])
            if queued or scheduled or running or failed:
                out.append(QueueStats(
                    text(flat[i]), queued=queued, scheduled=scheduled, running=running,
                    failed=failed,
                    oldest_ready_at=from_timestamp(oldest / 1000) if queued else None,
                ))
        return sorted(out, key=lambda s: s.queue)

    @guarded
    async def purge(self, queue: str | None = None) -> int:
        if queue is not None:
            check_queue_name(queue)
        total = 0
        while True:
            dropped, seen = await self._script("purge", BATCH, queue or "",
                                               self.backend.settings.record_ttl_ms)
            total += int(dropped)
            if int(seen) < BATCH or not int(dropped):
                return total

    # --- dead letters (issue 11) -------------------------------------------------------

    @guarded
    async def failed(
        self,
        queue: str | None = None,
        since: datetime | None = None,
        before: datetime | None = None,
        limit: int = 100,
    ) -> list[FailedTask]:
        """One script call: the queues' indexes by failure time give the page; only the
        records on it are read. `failed_at` is the stored millisecond, exactly, so a
        page's last one pages on (`before=`) and any one bounds a range (`since=`).

        A page never ends inside a group of dead letters that failed in the same
        millisecond: the group comes whole, past `limit` if need be. A burst of
        failures shares a few milliseconds (1,000 failed together: 14 of them), and
        `before=` a time cut inside its group would skip the rest (160 of those 1,000
        when paged by 200)."""
        if queue is not None:
            check_queue_name(queue)
        if limit <= 0:
            return []
        flat = await self._script(
            "failed", limit, queue or "", "" if since is None else ms_ceil(since),
            "" if before is None else ms_ceil(before),
        )
        out = []
        for i in range(0, len(flat), 4):
            task_id, at, data, name = flat[i : i + 4]
            task, _ = decode_task_or_placeholder(data, text(task_id), text(name))
            out.append(FailedTask(task, from_ms(int(at))))
        return out

    @guarded
    async def forget(self, task_ids: Sequence[str]) -> int:
        """BATCH ids per script call, the calls sent together (one round trip)."""
        ids = list(dict.fromkeys(task_ids))
        ttl = self.backend.settings.record_ttl_ms
        counts = await asyncio.gather(*(
            self._script("forget", ttl, *ids[i : i + BATCH]) for i in range(0, len(ids), BATCH)
        ))
        return sum(int(n) for n in counts)

    # --- named records beside the queue (issue 11) ----------------------------------------
    # One hash per kind, P:rec:<kind>, name -> data: one command per call, so the
    # list_records("cancel") that every busy worker sends each second is one HGETALL.
    # Names that could never be stored are never found (no call).

    def _rec(self, kind: str) -> str:
        return f"{self._p}rec:{kind}"

    @guarded
    async def put_record(self, kind: str, name: str, data: bytes) -> None:
        check_record_name(kind, name)
        await self._conn.call("HSET", self._rec(kind), name, bytes(data))

    @guarded
    async def get_record(self, kind: str, name: str) -> bytes | None:
        if not _record_name(kind, name):
            return None
        data: bytes | None = await self._conn.call("HGET", self._rec(kind), name)
        return data

    @guarded
    async def list_records(self, kind: str) -> list[tuple[str, bytes]]:
        if not _record_name(kind, "x"):
            return []
        found = await self._conn.call("HGETALL", self._rec(kind))
        return sorted((text(n), bytes(d)) for n, d in pairs(found))

    @guarded
    async def delete_record(self, kind: str, name: str) -> bool:
        if not _record_name(kind, name):
            return False
        return bool(await self._conn.call("HDEL", self._rec(kind), name))

    # --- workers ----------------------------------------------------------------------

    @guarded
    async def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        await self._script("worker_set", info.worker_id, encode_worker(info), int(ttl * 1000))

    @guarded
    async def unregister_worker(self, worker_id: str) -> None:
        await self._script("worker_delete", worker_id)

    @guarded
    async def workers(self) -> list[WorkerInfo]:
        rows = await self._script("worker_list")
        return sorted((decode_worker(r) for r in rows), key=lambda w: w.worker_id)


def _record_name(kind: str, name: str) -> bool:
    try:
        check_record_name(kind, name)
    except ValueError:
        return False
    return True


def _checked_queues(queues: Sequence[str]) -> tuple[str, ...]:
    names = tuple(queues)
    if not names:
        raise ValueError("dequeue needs at least one queue name")
    for name in names:
        check_queue_name(name)
    return names


def _delivery(row: list[Any]) -> Delivery:
    data, attempt, token, task_id, queue, _ = row
    task, problem = decode_task_or_placeholder(data or b"", text(task_id), text(queue))
    return Delivery(task=task, attempt=int(attempt), receipt=text(token), problem=problem)
