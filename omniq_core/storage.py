"""The three store roles (Protocols) and the behaviour every backend shares.

Backends implement a few primitives; waiting, following, TTL math and the
thread that runs blocking drivers live here, once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar, runtime_checkable

from omniq.errors import BackendError
from omniq.models import (
    Delivery,
    EventFilter,
    EventType,
    FailedTask,
    QueueStats,
    Task,
    TaskEvent,
    TaskResult,
    WorkerInfo,
    utcnow,
)
from omniq.threads import Threads

T = TypeVar("T")


@runtime_checkable
class TaskQueue(Protocol):
    """Where tasks wait. Delivery is at-least-once on every durable backend."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def enqueue(self, task: Task) -> str:
        """Store the task; return its id. Idempotent: a task of the same id that is
        unfinished is left as it is. A dead letter of the same id is queued again from
        scratch (attempts 0): that is how `omniq retry` runs a failed task again.

        Unique keys: a task's `unique_key` is held while it is unfinished and, once it
        finished (either way), for `task.unique_ttl` seconds more (None/0: freed when it
        finishes). Enqueueing a held key stores nothing and returns the holder's id.
        Cancel and purge free the key at once."""

    async def dequeue(self, queues: Sequence[str], lease: float, timeout: float) -> Delivery | None:
        """Claim the next runnable task: queues in the order given, then higher
        priority, then older. Skips tasks whose ETA is in the future. Waits up
        to `timeout` seconds (0 = do not wait). The attempt is counted here, when the
        lease is taken. The lease lasts `lease` seconds; when it expires the task
        becomes claimable again (its next claim counts one more attempt).

        A stored task that does not decode is still delivered, with `problem` set and
        a placeholder task (`serialization.decode_task_or_placeholder`), so the worker
        can fail it: bad data never blocks a queue or stops a worker.

        A claim whose reply was lost (connection dropped after the server did it) must
        not strand its task: server backends re-find such a claim on their next call."""

    async def dequeue_many(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int
    ) -> list[Delivery]:
        """Claim up to `limit` tasks in one call (in `dequeue` order), waiting up to
        `timeout` for the first one only: what a worker with several free slots asks
        for. Same leases, attempts and problem deliveries as `dequeue`. Stores without
        a batch primitive use `dequeue_some`."""

    async def ack(self, delivery: Delivery, *, failed: bool = False) -> bool:
        """Finish the task if this delivery still holds its lease; False (and nothing
        changed) when the lease was lost. `failed=True` keeps it as a dead letter
        (counted in stats, readable by get_task) until purged or retried."""

    async def retry(self, delivery: Delivery, delay: float) -> bool:
        """Put the task back to run again after `delay` seconds if this delivery still
        holds its lease (False otherwise). The next delivery counts attempt + 1."""

    async def release(self, delivery: Delivery, delay: float = 0.0) -> None:
        """Hand the task back without counting the attempt (only while this delivery
        holds the lease), claimable again after `delay` seconds (a task waiting for
        the tasks it depends on)."""

    async def extend(self, delivery: Delivery, lease: float) -> bool:
        """Renew the lease for `lease` seconds from now; False if it was lost."""

    async def cancel(self, task_id: str) -> bool:
        """Remove a task that no worker holds; False if running, done or unknown."""

    async def get_task(self, task_id: str) -> Task | None:
        """The task while it is queued, scheduled, running or dead-lettered (a
        placeholder when its payload does not decode; never a decode error)."""

    async def stats(self) -> list[QueueStats]: ...

    async def failed(
        self,
        queue: str | None = None,
        since: datetime | None = None,
        before: datetime | None = None,
        limit: int = 100,
    ) -> list[FailedTask]:
        """Dead letters, newest failure first: of one queue (or all), failed at or after
        `since` and before `before` (to page backwards), `limit` of them — more when the
        last ones share one failure time (a burst of failures in one millisecond): a page
        never ends inside such a group, so paging by `before=page[-1].failed_at` misses
        none. Read through an index by failure time: never a scan of every task."""

    async def forget(self, task_ids: Sequence[str]) -> int:
        """Delete these dead letters (others are left alone); how many were deleted."""

    # Small named records kept beside the queue (schedules, cancel requests): `kind`
    # and `name` are plain names ([A-Za-z0-9_.:-]); `data` a few KB at most.
    async def put_record(self, kind: str, name: str, data: bytes) -> None: ...
    async def get_record(self, kind: str, name: str) -> bytes | None: ...
    async def list_records(self, kind: str) -> list[tuple[str, bytes]]: ...
    async def delete_record(self, kind: str, name: str) -> bool: ...

    async def purge(self, queue: str | None = None) -> int:
        """Drop waiting and dead-lettered tasks (of one queue, or all); running
        tasks are left alone. Returns how many were dropped."""

    async def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        """Record or refresh a live worker; it disappears `ttl` s after its last call."""

    async def unregister_worker(self, worker_id: str) -> None: ...
    async def workers(self) -> list[WorkerInfo]: ...


@runtime_checkable
class ResultStorage(Protocol):
    """One outcome per task. An expired result (expires_at passed) reads as None."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def store(self, result: TaskResult) -> bool:
        """Store the task's outcome unless one is already stored: the first final
        outcome wins. Atomic across processes (a conditional create: SET NX, INSERT ...
        ON CONFLICT DO NOTHING, a KV create, an exclusive file create). True when this
        call stored it; False when an unexpired result was there (it is kept).
        `delete` clears the way for a new outcome (`omniq retry`)."""

    async def get(self, task_id: str) -> TaskResult | None: ...

    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        """Block until the result exists (None after `timeout`; None timeout = forever)."""

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskResult]:
        """The stored (unexpired) results of these tasks, by id, in one round trip."""

    async def delete(self, task_id: str) -> bool: ...

    async def cleanup(self, now: datetime, finished_before: datetime | None = None) -> int:
        """Delete results whose expires_at <= now, and (when given) those whose
        finished_at < finished_before; return how many."""


@runtime_checkable
class EventStorage(Protocol):
    """Append-only lifecycle log with an opaque, ordered cursor per event."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def append(self, event: TaskEvent) -> None:
        """Store the event once: an event whose `id` is already stored is dropped, so a
        write sent again after a lost reply leaves one copy."""

    async def append_many(self, events: Sequence[TaskEvent]) -> None:
        """`append` for many, in order, in as few round trips as the store allows."""

    async def get(self, task_id: str) -> list[TaskEvent]:
        """Every stored event of one task, oldest first."""

    async def read(self, after: str | None, limit: int) -> list[tuple[str, TaskEvent]]:
        """Events of all tasks after cursor `after` (None = from the oldest),
        oldest first, at most `limit`, each with its cursor."""

    async def latest(self, limit: int, before: str | None = None) -> list[tuple[str, TaskEvent]]:
        """The newest `limit` events (older than cursor `before` when given), oldest
        first, each with its cursor: what `read` returns for them, so `read` from
        the last one continues after them and `before` pages backwards."""

    async def last_cursor(self) -> str | None:
        """Cursor of the newest event (None when empty): 'follow from now'."""

    async def wait_new(self, after: str | None, timeout: float) -> None:
        """Return when events after `after` may exist, or after `timeout`."""

    async def cleanup(self, before: datetime) -> int:
        """Delete events with timestamp < before; return how many."""


@runtime_checkable
class FusedOps(Protocol):
    """Fused writes of a Backend that holds all three roles of a worker or client (one
    Redis, one PostgreSQL database, one NATS account, one SQLite file set, one local
    directory): one round trip each where the technology has transactions or scripts
    (Redis, PostgreSQL, SQLite, files: one store-thread call), two on NATS (no multi-key
    atomic writes).
    The worker and client use them when `fused_ops()` finds them; otherwise they write
    to the three stores one by one (mixed setups). Same guarantees as the generic path:
    ENQUEUED sorts before anything else of the task, STARTED is stored before the task
    runs, the result is stored before the ack, and an outcome event is written only by
    the writer whose result was stored (the first final outcome wins)."""

    async def submit(self, task: Task, event: TaskEvent) -> str:
        """`enqueue(task)` and append its ENQUEUED `event`, at once. A held unique key
        stores nothing (no event either) and returns the holder's id."""

    async def claim(
        self,
        queues: Sequence[str],
        lease: float,
        timeout: float,
        limit: int,
        worker_id: str,
    ) -> list[Delivery]:
        """`dequeue_many`, plus, for each delivery, its STARTED event
        (`started_event(delivery, worker_id)`), stored in the same round trip. No
        STARTED is written for a problem delivery, a task whose `expires_at` passed, or
        an attempt beyond `max_retries + 1` (the worker fails those without running
        them). A claimed task whose result is already stored (its worker died between
        the result and the ack) is acked (dead-lettered when that result is not ok) and
        not returned."""

    async def finish(
        self, delivery: Delivery, result: TaskResult, event: TaskEvent, *, failed: bool
    ) -> bool:
        """Store `result` unless one is stored (as `ResultStorage.store`); only if this
        call stored it (or the stored one is identical: a re-sent write), append the
        outcome `event`; then `ack(delivery, failed=failed)` (fenced by the lease). One
        round trip; returns whether `result` is the stored outcome."""


_FUSED_CLASSES: dict[type, bool] = {}


def fused_ops(*stores: Any) -> FusedOps | None:
    """The fused operations when one Backend holds all of `stores`, else None."""
    backend = getattr(stores[0], "backend", None)
    if backend is None:
        return None
    fused = _FUSED_CLASSES.get(type(backend))
    if fused is None:  # a runtime Protocol check costs ~20 us: once per class
        fused = _FUSED_CLASSES[type(backend)] = isinstance(backend, FusedOps)
    if not fused:
        return None
    if any(getattr(store, "backend", None) is not backend for store in stores[1:]):
        return None
    return backend


def started_event(
    delivery: Delivery, worker_id: str, timestamp: datetime | None = None
) -> TaskEvent:
    """The STARTED event of a delivery. Its id names the claim, so the same claim can
    never store two, while a later claim of the same attempt number (after a release)
    gets its own."""
    task = delivery.task
    return TaskEvent(
        task_id=task.id,
        event_type=EventType.STARTED,
        timestamp=timestamp or utcnow(),
        attempt=delivery.attempt,
        worker_id=worker_id,
        queue=task.queue,
        id=f"started:{task.id}:{delivery.attempt}:{delivery.receipt}",
    )


def runs_now(delivery: Delivery, now: datetime | None = None) -> bool:
    """Whether a worker will run this delivery at once (so its STARTED is due): not a
    problem delivery, not expired, not waiting for other tasks, and within its
    attempts (else the worker fails it or hands it back)."""
    task = delivery.task
    if delivery.problem is not None:
        return False
    if task.expires_at is not None and task.expires_at <= (now or utcnow()):
        return False
    if task.after:  # waits for other tasks first: the worker writes STARTED when it runs
        return False
    return delivery.attempt <= task.max_retries + 1


async def dequeue_some(
    queue: TaskQueue, queues: Sequence[str], lease: float, timeout: float, limit: int
) -> list[Delivery]:
    """`dequeue_many` for a store without a batch primitive: one waiting dequeue, then
    non-waiting ones while tasks are there."""
    first = await queue.dequeue(queues, lease, timeout)
    if first is None:
        return []
    got = [first]
    while len(got) < limit:
        more = await queue.dequeue(queues, lease, 0)
        if more is None:
            break
        got.append(more)
    return got


# --- shared helpers -------------------------------------------------------


class NumberedCursors:
    """Cursors for stores whose events carry a growing integer (row id, stream
    sequence): zero-padded, so they also sort as strings."""

    def __init__(self, width: int, store: str) -> None:
        self.width = width
        self.store = store

    def format(self, number: int) -> str:
        return f"{number:0{self.width}d}"

    def parse(self, cursor: str | None) -> int:
        """The number behind `cursor`; 0 for None (before the first event)."""
        if cursor is None:
            return 0
        try:
            return int(cursor)
        except ValueError:
            raise BackendError(f"{cursor!r} is not a {self.store} event cursor") from None


class BlockingRunner(Threads):
    """One dedicated thread for a blocking driver (fsspec): keeps the event loop free and
    gives the driver one owning thread; a forked child gets its own thread. A thin facade
    of `omniq.threads.Threads` (`await runner.run(fn, *args)`; `shutdown()` waits)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, 1)

    def shutdown(self, wait: bool = True) -> None:
        super().shutdown(wait)


class LocalSignal:
    """Wakes waiters in this process at once; other processes are reached by polling.

    Works across event loops: waiters register a future on their own loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}

    def notify(self, key: str) -> None:
        with self._lock:
            waiters = self._waiters.pop(key, [])
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_set_done, fut)

    async def wait(self, key: str, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry = (loop, fut)
        with self._lock:
            self._waiters.setdefault(key, []).append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                lst = self._waiters.get(key)
                if lst and entry in lst:
                    lst.remove(entry)
                    if not lst:
                        del self._waiters[key]


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class PollingBackoff:
    """Poll intervals that start short (fast round trips) and grow when idle."""

    def __init__(self, first: float = 0.002, most: float = 0.25, factor: float = 1.5) -> None:
        self.first = first
        self.most = most
        self.factor = factor
        self.current = first

    def next(self) -> float:
        value = self.current
        self.current = min(self.most, self.current * self.factor)
        return value

    def reset(self) -> None:
        self.current = self.first


async def poll_for_result(
    get: Callable[[str], Any],
    signal: LocalSignal,
    task_id: str,
    timeout: float | None,
    *,
    first: float = 0.002,
    most: float = 0.25,
    factor: float = 1.5,
) -> TaskResult | None:
    """Shared `ResultStorage.wait` for stores without push: poll `get` with a
    growing interval (`first`, times `factor` up to `most`: a store whose `get` is
    cheap polls sooner), woken early by results stored from this process."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    backoff = PollingBackoff(first, most, factor)
    while True:
        result: TaskResult | None = await get(task_id)
        if result is not None:
            return result
        # The loop's selector (epoll) sleeps whole milliseconds, rounding up: 1.2 ms
        # would sleep 2. The nearest whole millisecond polls when the schedule means to.
        pause = max(0.001, round(backoff.next(), 3))
        if deadline is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            pause = min(pause, remaining)
        await signal.wait(task_id, pause)


async def follow_events(
    storage: EventStorage,
    after: str | None,
    filters: EventFilter | None = None,
    batch: int = 500,
    idle_wait: float = 1.0,
) -> AsyncIterator[tuple[str, TaskEvent]]:
    """Yield (cursor, event) forever from cursor `after`; what `omniq tail` reads."""
    cursor = after
    while True:
        rows = await storage.read(cursor, batch)
        for cur, event in rows:
            cursor = cur
            if filters is None or filters.matches(event):
                yield cur, event
        if len(rows) < batch:
            await storage.wait_new(cursor, idle_wait)
