"""In-process stores for all three roles: nothing survives the process, nothing is shared."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from omniq.models import (
    Delivery,
    FailedTask,
    QueueStats,
    Task,
    TaskEvent,
    TaskResult,
    WorkerInfo,
    check_record_name,
    from_timestamp,
    utcnow,
)
from omniq.registry import Role
from omniq.storage import (
    EventStorage,
    LocalSignal,
    ResultStorage,
    TaskQueue,
    runs_now,
    started_event,
)


@dataclass
class _Entry:
    task: Task
    attempts: int = 0
    state: str = "waiting"  # waiting | running | failed
    ready_at: float = 0.0
    lease_until: float = 0.0
    token: int = 0
    failed_at: datetime | None = None


@dataclass
class _Lane:
    """One named queue: a heap of (-priority, ready_at, seq, task_id)."""

    heap: list[tuple[int, float, int, str]] = field(default_factory=list)


class MemoryQueue:
    """A queue for one process (tests, embedded use, local callables).

    `any_lane=True`: a dequeue also takes tasks of queues it did not name (after the
    named ones): the private queue of an embedded worker runs whatever it is given.
    """

    backend: Any = None  # the MemoryBackend holding it, if any

    def __init__(self, *, any_lane: bool = False) -> None:
        self._any_lane = any_lane
        self._entries: dict[str, _Entry] = {}
        self._lanes: dict[str, _Lane] = {}
        self._unique: dict[str, tuple[str, float | None]] = {}  # key -> (task id, held until)
        self._leased: dict[str, _Entry] = {}
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}
        self._records: dict[tuple[str, str], bytes] = {}
        self._seq = itertools.count()
        self._tokens = itertools.count(1)
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _push(self, entry: _Entry) -> None:
        lane = self._lanes.setdefault(entry.task.queue, _Lane())
        item = (-entry.task.priority, entry.ready_at, next(self._seq), entry.task.id)
        heapq.heappush(lane.heap, item)

    async def enqueue(self, task: Task) -> str:
        old = self._entries.get(task.id)
        if old is not None and old.state != "failed":
            return task.id  # already queued: nothing to do
        if task.unique_key is not None:
            holder = self._key_holder(task.unique_key)
            if holder is not None and holder != task.id:
                return holder
            self._unique[task.unique_key] = (task.id, None)
        ready = task.eta.timestamp() if task.eta else 0.0
        entry = _Entry(task=task, ready_at=ready)
        self._entries[task.id] = entry
        self._push(entry)
        await self._wake()
        return task.id

    async def _wake(self) -> None:
        cond = self._condition()
        async with cond:
            cond.notify_all()

    def _reclaim_expired(self, now: float) -> None:
        expired = [e for e in self._leased.values() if e.lease_until <= now]
        for entry in expired:
            self._set_state(entry, "waiting")
            entry.ready_at = 0.0
            self._push(entry)

    def _set_state(self, entry: _Entry, state: str) -> None:
        entry.state = state
        if state == "running":
            self._leased[entry.task.id] = entry
        else:
            self._leased.pop(entry.task.id, None)

    def _claim(self, queues: Sequence[str], lease: float) -> Delivery | None:
        now = time.time()
        self._reclaim_expired(now)
        if self._any_lane:
            queues = [*queues, *(name for name in self._lanes if name not in queues)]
        for name in queues:
            lane = self._lanes.get(name)
            if lane is None:
                continue
            delivery = self._claim_from(lane, now, lease)
            if delivery is not None:
                return delivery
        return None

    def _claim_from(self, lane: _Lane, now: float, lease: float) -> Delivery | None:
        skipped: list[tuple[int, float, int, str]] = []
        found: Delivery | None = None
        while lane.heap:
            item = heapq.heappop(lane.heap)
            entry = self._entries.get(item[3])
            if entry is None or entry.state != "waiting" or entry.ready_at != item[1]:
                continue  # stale heap item
            if entry.ready_at > now:
                skipped.append(item)
                continue
            self._set_state(entry, "running")
            entry.attempts += 1
            entry.lease_until = now + lease
            entry.token = next(self._tokens)
            found = Delivery(task=entry.task, attempt=entry.attempts, receipt=entry.token)
            break
        for item in skipped:
            heapq.heappush(lane.heap, item)
        return found

    async def dequeue(self, queues: Sequence[str], lease: float, timeout: float) -> Delivery | None:
        deadline = time.monotonic() + timeout
        cond = self._condition()
        while True:
            delivery = self._claim(queues, lease)
            if delivery is not None:
                return delivery
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # Wake for new work, or soon enough to see ETAs and expired leases.
            async with cond:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cond.wait(), min(remaining, 0.05))

    async def dequeue_many(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int
    ) -> list[Delivery]:
        first = await self.dequeue(queues, lease, timeout)
        if first is None:
            return []
        got = [first]
        while len(got) < limit and (more := self._claim(queues, lease)) is not None:
            got.append(more)
        return got

    def _held(self, delivery: Delivery) -> _Entry | None:
        entry = self._entries.get(delivery.task_id)
        if entry is None or entry.state != "running" or entry.token != delivery.receipt:
            return None
        return entry

    def _key_holder(self, key: str) -> str | None:
        """The task holding `key`: unfinished, or finished less than its unique_ttl ago."""
        held = self._unique.get(key)
        if held is None:
            return None
        task_id, until = held
        if until is None:
            if task_id in self._entries and self._entries[task_id].state != "failed":
                return task_id
        elif until > time.time():
            return task_id
        del self._unique[key]
        return None

    def _settle_key(self, task: Task, keep: bool) -> None:
        """The task finished: keep its key for unique_ttl more seconds, or free it now."""
        key = task.unique_key
        if key is None or self._unique.get(key, (None,))[0] != task.id:
            return
        if keep and task.unique_ttl:
            self._unique[key] = (task.id, time.time() + task.unique_ttl)
        else:
            del self._unique[key]

    def _finish(self, task_id: str, keep_key: bool = False) -> None:
        self._leased.pop(task_id, None)
        entry = self._entries.pop(task_id, None)
        if entry is not None:
            self._settle_key(entry.task, keep_key)

    async def ack(self, delivery: Delivery, *, failed: bool = False) -> bool:
        entry = self._held(delivery)
        if entry is None:
            return False
        if failed:
            self._set_state(entry, "failed")
            entry.failed_at = utcnow()
            self._settle_key(entry.task, keep=True)
        else:
            self._finish(delivery.task_id, keep_key=True)
        return True

    async def retry(self, delivery: Delivery, delay: float) -> bool:
        entry = self._held(delivery)
        if entry is None:
            return False
        self._set_state(entry, "waiting")
        entry.ready_at = time.time() + delay
        self._push(entry)
        await self._wake()
        return True

    async def release(self, delivery: Delivery, delay: float = 0.0) -> None:
        entry = self._held(delivery)
        if entry is None:
            return
        self._set_state(entry, "waiting")
        entry.attempts = max(0, entry.attempts - 1)
        entry.ready_at = time.time() + delay if delay > 0 else 0.0
        self._push(entry)
        await self._wake()

    async def extend(self, delivery: Delivery, lease: float) -> bool:
        entry = self._held(delivery)
        if entry is None:
            return False
        entry.lease_until = time.time() + lease
        return True

    async def cancel(self, task_id: str) -> bool:
        entry = self._entries.get(task_id)
        if entry is None or entry.state != "waiting":
            return False
        self._finish(task_id)
        return True

    async def get_task(self, task_id: str) -> Task | None:
        entry = self._entries.get(task_id)
        return entry.task if entry else None

    async def stats(self) -> list[QueueStats]:
        now = time.time()
        counts: dict[str, dict[str, int]] = {}
        oldest: dict[str, float] = {}
        for entry in self._entries.values():
            c = counts.setdefault(entry.task.queue, {})
            state = entry.state
            if state == "waiting":
                state = "scheduled" if entry.ready_at > now else "queued"
            if state == "queued":
                since = entry.ready_at or entry.task.created_at.timestamp()
                oldest[entry.task.queue] = min(oldest.get(entry.task.queue, since), since)
            c[state] = c.get(state, 0) + 1
        return [
            QueueStats(
                queue=name,
                queued=c.get("queued", 0),
                scheduled=c.get("scheduled", 0),
                running=c.get("running", 0),
                failed=c.get("failed", 0),
                oldest_ready_at=from_timestamp(oldest.get(name)),
            )
            for name, c in sorted(counts.items())
        ]

    async def purge(self, queue: str | None = None) -> int:
        doomed = [
            tid
            for tid, e in self._entries.items()
            if e.state != "running" and (queue is None or e.task.queue == queue)
        ]
        for tid in doomed:
            self._finish(tid)
        return len(doomed)

    async def failed(
        self,
        queue: str | None = None,
        since: datetime | None = None,
        before: datetime | None = None,
        limit: int = 100,
    ) -> list[FailedTask]:
        dead = [
            FailedTask(e.task, e.failed_at)
            for e in self._entries.values()
            if e.state == "failed" and e.failed_at is not None
            and (queue is None or e.task.queue == queue)
            and (since is None or e.failed_at >= since)
            and (before is None or e.failed_at < before)
        ]
        dead.sort(key=lambda f: f.failed_at, reverse=True)
        end = min(limit, len(dead))
        while 0 < end < len(dead) and dead[end].failed_at == dead[end - 1].failed_at:
            end += 1  # a page never ends inside a group of one failure time
        return dead[:end]

    async def forget(self, task_ids: Sequence[str]) -> int:
        gone = [t for t in task_ids if (e := self._entries.get(t)) and e.state == "failed"]
        for task_id in gone:
            self._finish(task_id)
        return len(gone)

    async def put_record(self, kind: str, name: str, data: bytes) -> None:
        check_record_name(kind, name)
        self._records[(kind, name)] = bytes(data)

    async def get_record(self, kind: str, name: str) -> bytes | None:
        return self._records.get((kind, name))

    async def list_records(self, kind: str) -> list[tuple[str, bytes]]:
        return sorted((n, d) for (k, n), d in self._records.items() if k == kind)

    async def delete_record(self, kind: str, name: str) -> bool:
        return self._records.pop((kind, name), None) is not None

    async def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        self._workers[info.worker_id] = (info, time.time() + ttl)

    async def unregister_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def workers(self) -> list[WorkerInfo]:
        now = time.time()
        return [info for info, until in self._workers.values() if until > now]


class MemoryResultStorage:
    """Results in a dict; waiters in this process are woken at once."""

    backend: Any = None

    def __init__(self) -> None:
        self._results: dict[str, TaskResult] = {}
        self._signal = LocalSignal()

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def store(self, result: TaskResult) -> bool:
        if await self.get(result.task_id) is not None:
            return False  # the first final outcome wins
        self._results[result.task_id] = result
        self._signal.notify(result.task_id)
        return True

    async def get(self, task_id: str) -> TaskResult | None:
        result = self._results.get(task_id)
        if result is None or result.is_expired():
            return None
        return result

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskResult]:
        found = {t: await self.get(t) for t in task_ids}
        return {t: r for t, r in found.items() if r is not None}

    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            result = await self.get(task_id)
            if result is not None:
                return result
            pause = 1.0 if deadline is None else min(1.0, deadline - loop.time())
            if pause <= 0:
                return None
            await self._signal.wait(task_id, pause)

    async def delete(self, task_id: str) -> bool:
        return self._results.pop(task_id, None) is not None

    async def cleanup(self, now: datetime, finished_before: datetime | None = None) -> int:
        doomed = [
            tid
            for tid, r in self._results.items()
            if r.is_expired(now) or (finished_before and r.finished_at < finished_before)
        ]
        for tid in doomed:
            del self._results[tid]
        return len(doomed)


class MemoryEventStorage:
    """An append-only list; the cursor is the position, zero-padded so it sorts."""

    backend: Any = None

    def __init__(self) -> None:
        self._events: list[TaskEvent | None] = []
        self._by_task: dict[str, list[int]] = {}
        self._ids: set[str] = set()
        self._signal = LocalSignal()

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def append(self, event: TaskEvent) -> None:
        if event.id in self._ids:
            return  # sent again: stored once
        self._ids.add(event.id)
        self._by_task.setdefault(event.task_id, []).append(len(self._events))
        self._events.append(event)
        self._signal.notify("*")

    async def append_many(self, events: Sequence[TaskEvent]) -> None:
        for event in events:
            await self.append(event)

    async def get(self, task_id: str) -> list[TaskEvent]:
        return [e for i in self._by_task.get(task_id, []) if (e := self._events[i]) is not None]

    async def read(self, after: str | None, limit: int) -> list[tuple[str, TaskEvent]]:
        start = 0 if after is None else int(after) + 1
        out: list[tuple[str, TaskEvent]] = []
        for i in range(start, len(self._events)):
            event = self._events[i]
            if event is not None:
                out.append((f"{i:016d}", event))
                if len(out) >= limit:
                    break
        return out

    async def latest(self, limit: int, before: str | None = None) -> list[tuple[str, TaskEvent]]:
        end = len(self._events) if before is None else min(int(before), len(self._events))
        out: list[tuple[str, TaskEvent]] = []
        for i in range(end - 1, -1, -1):  # backwards: cleaned-up slots are holes to skip
            if len(out) >= limit:
                break
            event = self._events[i]
            if event is not None:
                out.append((f"{i:016d}", event))
        return out[::-1]

    async def last_cursor(self) -> str | None:
        return f"{len(self._events) - 1:016d}" if self._events else None

    async def wait_new(self, after: str | None, timeout: float) -> None:
        last = await self.last_cursor()
        if last is not None and (after is None or last > after):
            return
        await self._signal.wait("*", timeout)

    async def cleanup(self, before: datetime) -> int:
        count = 0
        for i, event in enumerate(self._events):
            if event is not None and event.timestamp < before:
                self._events[i] = None
                self._by_task[event.task_id].remove(i)
                self._ids.discard(event.id)
                count += 1
        return count


class MemoryBackend:
    """All three roles in one process, with the fused operations: the reference for
    what the other technologies do in one round trip (omniq.storage.FusedOps)."""

    def __init__(self) -> None:
        self._queue = MemoryQueue()
        self._results = MemoryResultStorage()
        self._events = MemoryEventStorage()
        for store in (self._queue, self._results, self._events):
            store.backend = self

    def queue(self) -> TaskQueue:
        return self._queue

    def results(self) -> ResultStorage:
        return self._results

    def events(self) -> EventStorage:
        return self._events

    async def submit(self, task: Task, event: TaskEvent) -> str:
        queue = self._queue
        holder = queue._key_holder(task.unique_key) if task.unique_key else None
        if holder is not None and holder != task.id:
            return holder
        await self._events.append(event)
        return await queue.enqueue(task)

    async def claim(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int, worker_id: str
    ) -> list[Delivery]:
        got = []
        for delivery in await self._queue.dequeue_many(queues, lease, timeout, limit):
            existing = await self._results.get(delivery.task_id)
            if existing is not None and delivery.problem is None:
                await self._queue.ack(delivery, failed=not existing.ok)
                continue
            if runs_now(delivery):
                await self._events.append(started_event(delivery, worker_id))
            got.append(delivery)
        return got

    async def finish(
        self, delivery: Delivery, result: TaskResult, event: TaskEvent, *, failed: bool
    ) -> bool:
        stored = await self._results.store(result)
        if stored or await self._results.get(result.task_id) == result:
            await self._events.append(event)
            stored = True
        await self._queue.ack(delivery, failed=failed)
        return stored


def create(role: Role, settings: Mapping[str, Any]) -> TaskQueue | ResultStorage | EventStorage:
    """Stores of their own: two memory configs never share data (tests rely on it).
    `MemoryBackend` puts the three roles on one Backend."""
    if role == "queue":
        return MemoryQueue()
    if role == "results":
        return MemoryResultStorage()
    return MemoryEventStorage()
