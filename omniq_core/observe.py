"""The read model behind `omniq metrics`, `omniq top` and the dashboard: what any host
can compute from the stores (queue depths and oldest waits, live workers, rates from
the event log, the last failures, one task's whole story).

Rates come from event timestamps, not from two snapshots: an `Observer` seeds a time
window from the newest events (so even a one-shot view has rates), then reads only
what arrived since its cursor. Nothing here writes to a store.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from omniq.errors import redact
from omniq.models import (
    EventType,
    QueueStats,
    Task,
    TaskEvent,
    TaskResult,
    TaskStatus,
    WorkerInfo,
    is_valid_id,
    utcnow,
)

if TYPE_CHECKING:
    from omniq.client import AsyncOmniQ
    from omniq.operate import FailedInfo
    from omniq.schedules import Schedule

WINDOW = 60.0  # seconds the rates average over
SEED_EVENTS = 2000  # newest events read at the start to fill the window
PAGE = 1000  # events read per call afterwards
MAX_PAGES = 10  # per refresh; beyond it the next refresh goes on where this one stopped
RECENT_FAILURES = 50  # failures remembered for the "last failures" panel
FAILED_SCAN = 10_000  # events looked through (newest first) for the failed list

ARRIVED = frozenset({EventType.ENQUEUED})
FINISHED = frozenset(
    {EventType.COMPLETED, EventType.FAILED, EventType.TIMEOUT, EventType.EXPIRED,
     EventType.CANCELLED}
)
FAILURES = frozenset({EventType.FAILED, EventType.TIMEOUT, EventType.EXPIRED})


# --- the views ------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueView:
    queue: str
    queued: int  # ready to run now (the depth)
    scheduled: int
    running: int
    failed: int  # dead letters kept
    oldest_wait: float | None  # seconds the oldest ready task has waited; None: none ready
    rate_in: float  # tasks enqueued per second over the window
    rate_out: float  # tasks finished (any outcome) per second over the window


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    running: int
    concurrency: int
    tasks_done: int
    heartbeat_age: float  # seconds since its last heartbeat
    started_at: datetime
    current_tasks: tuple[str, ...]
    events_held: int
    events_dropped: int


@dataclass(frozen=True)
class Failure:
    task_id: str
    queue: str | None
    func: str | None  # None when the task is no longer kept
    outcome: str  # failed | timeout | expired
    at: datetime
    attempt: int
    error: str  # "Type: message", secrets masked


@dataclass(frozen=True)
class Overview:
    taken_at: datetime
    window: float  # seconds the rates cover (less than WINDOW while the log is young)
    queues: list[QueueView]
    workers: list[WorkerView]
    failures: list[Failure]  # newest first

    @property
    def failed(self) -> int:
        return sum(q.failed for q in self.queues)

    @property
    def depth(self) -> int:
        return sum(q.queued for q in self.queues)

    @property
    def oldest_wait(self) -> float | None:
        waits = [q.oldest_wait for q in self.queues if q.oldest_wait is not None]
        return max(waits) if waits else None


@dataclass(frozen=True)
class TaskView:
    task_id: str
    status: str  # pending | scheduled | running | completed | failed | timeout | ...
    queue: str | None
    func: str | None
    args: list[Any] | None  # None once the queue no longer keeps the task
    kwargs: dict[str, Any] | None
    attempts: int  # attempts begun so far
    max_attempts: int | None
    result: dict[str, Any] | None  # value or error (secrets masked in errors)
    events: list[dict[str, Any]] = field(default_factory=list)
    retryable: bool = False  # a failed outcome with the task kept as a dead letter


# --- rates --------------------------------------------------------------------------------


class RateWindow:
    """Counts of arrivals and finishes per queue over the last `window` seconds."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._marks: collections.deque[tuple[float, str, bool]] = collections.deque()
        self._covered_from: float | None = None  # when the events we saw begin, if later

    def add(self, event: TaskEvent) -> None:
        arrived = event.event_type in ARRIVED
        if arrived or event.event_type in FINISHED:
            self._marks.append((event.timestamp.timestamp(), event.queue or "default", arrived))

    def covered_from(self, moment: float) -> None:
        """The events seen start at `moment`: earlier ones were not read."""
        self._covered_from = moment

    def rates(self, now: float) -> tuple[float, dict[str, tuple[float, float]]]:
        """(seconds covered, queue -> (in/s, out/s))."""
        start = now - self.window
        while self._marks and self._marks[0][0] < start:
            self._marks.popleft()
        if self._covered_from is not None and self._covered_from > start:
            start = self._covered_from
        span = max(1.0, now - start)
        counts: dict[str, list[int]] = {}
        for moment, queue, arrived in self._marks:
            if moment >= start:
                counts.setdefault(queue, [0, 0])[0 if arrived else 1] += 1
        return span, {q: (c[0] / span, c[1] / span) for q, c in counts.items()}


# --- the observer -----------------------------------------------------------------------------


class Observer:
    """Reads the stores through one open client; keep one per view and call `overview()`
    as often as the view refreshes (each call reads only new events)."""

    def __init__(self, client: AsyncOmniQ, *, window: float = WINDOW, seed: int = SEED_EVENTS):
        self.client = client
        self.rates = RateWindow(window)
        self.seed = seed
        self._cursor: str | None = None
        self._seeded = False
        self._failures: collections.deque[TaskEvent] = collections.deque(maxlen=RECENT_FAILURES)
        self._funcs: dict[str, str | None] = {}  # task id -> func (immutable, so cached)

    async def overview(self, failures: int = 10) -> Overview:
        stats, workers, _ = await asyncio.gather(
            self.client.stats(), self.client.workers(), self._advance()
        )
        now = utcnow()
        span, rates = self.rates.rates(now.timestamp())
        queues = _queue_views(stats, rates, now)
        recent = await self._describe_failures(list(reversed(self._failures))[:failures])
        return Overview(
            taken_at=now,
            window=span,
            queues=queues,
            workers=[_worker_view(w, now) for w in workers],
            failures=recent,
        )

    async def _advance(self) -> None:
        events = self.client.events
        if not self._seeded:
            rows = await events.latest(self.seed)
            self._seeded = True
            if len(rows) >= self.seed:  # the log goes back further than we read
                self.rates.covered_from(rows[0][1].timestamp.timestamp())
            self._take(rows)
            return
        for _ in range(MAX_PAGES):
            rows = await events.read(self._cursor, PAGE)
            self._take(rows)
            if len(rows) < PAGE:
                return

    def _take(self, rows: Sequence[tuple[str, TaskEvent]]) -> None:
        for cursor, event in rows:
            self._cursor = cursor
            self.rates.add(event)
            if event.event_type in FAILURES:
                self._failures.append(event)
            elif event.event_type == EventType.ENQUEUED and "func" in event.details:
                self._funcs.setdefault(event.task_id, str(event.details["func"]))

    async def _describe_failures(self, events: Iterable[TaskEvent]) -> list[Failure]:
        seen: set[str] = set()
        picked = []
        for event in events:  # newest first: one line per task, its latest failure
            if event.task_id not in seen:
                seen.add(event.task_id)
                picked.append(event)
        funcs = await asyncio.gather(*(self._func_of(e.task_id) for e in picked))
        return [_failure(e, f) for e, f in zip(picked, funcs, strict=True)]

    async def _func_of(self, task_id: str) -> str | None:
        if task_id not in self._funcs:
            task = await self.client.queue.get_task(task_id)
            if task is None:  # not kept any more: its ENQUEUED event still names it
                return _func_from_events(await self.client.get_events(task_id))
            self._funcs[task_id] = task.func
        return self._funcs[task_id]

    # --- the failed list -------------------------------------------------------------------
    async def failed_tasks(self, limit: int = 50, scan: int = FAILED_SCAN) -> list[Failure]:
        """Tasks whose outcome is a failure now (retried ones drop out), newest first,
        found in the newest `scan` events: the event log is the index."""
        found: list[Failure] = []
        seen: set[str] = set()
        before: str | None = None
        read = 0
        while read < scan and len(found) < limit:
            rows = await self.client.events.latest(min(PAGE, scan - read), before)
            if not rows:
                break
            read += len(rows)
            before = rows[0][0]
            fresh = [e for _, e in reversed(rows) if e.event_type in FAILURES
                     and e.task_id not in seen]
            for event in fresh:
                seen.add(event.task_id)
            found += await self._still_failed(fresh)
        return found[:limit]

    async def _still_failed(self, events: list[TaskEvent]) -> list[Failure]:
        results = await asyncio.gather(*(self.client.results.get(e.task_id) for e in events))
        kept = [(e, r) for e, r in zip(events, results, strict=True) if r and not r.ok]
        funcs = await asyncio.gather(*(self._func_of(e.task_id) for e, _ in kept))
        return [_failure(e, f, r) for (e, r), f in zip(kept, funcs, strict=True)]

    # --- one task ---------------------------------------------------------------------------
    async def task(self, task_id: str) -> TaskView | None:
        """Everything the stores know of one task; None when none knows it."""
        if not is_valid_id(task_id):
            return None
        task, result, events = await asyncio.gather(
            self.client.queue.get_task(task_id),
            self.client.results.get(task_id),
            self.client.get_events(task_id),
        )
        if task is None and result is None and not events:
            return None
        return _task_view(task_id, task, result, events)


# --- building the views -------------------------------------------------------------------


def _queue_views(
    stats: list[QueueStats], rates: dict[str, tuple[float, float]], now: datetime
) -> list[QueueView]:
    by_name = {s.queue: s for s in stats}
    views = []
    for name in sorted(set(by_name) | set(rates)):
        s = by_name.get(name, QueueStats(queue=name))
        rate_in, rate_out = rates.get(name, (0.0, 0.0))
        oldest = None
        if s.oldest_ready_at is not None:
            oldest = max(0.0, (now - s.oldest_ready_at).total_seconds())
        views.append(
            QueueView(name, s.queued, s.scheduled, s.running, s.failed, oldest, rate_in, rate_out)
        )
    return views


def _worker_view(w: WorkerInfo, now: datetime) -> WorkerView:
    return WorkerView(
        worker_id=w.worker_id,
        host=w.host,
        pid=w.pid,
        queues=tuple(w.queues),
        running=len(w.current_tasks),
        concurrency=w.concurrency,
        tasks_done=w.tasks_done,
        heartbeat_age=max(0.0, (now - w.heartbeat_at).total_seconds()),
        started_at=w.started_at,
        current_tasks=tuple(w.current_tasks),
        events_held=w.events_buffered,
        events_dropped=w.events_dropped,
    )


def _failure(event: TaskEvent, func: str | None, result: TaskResult | None = None) -> Failure:
    if result is not None and result.error_type:
        error = f"{result.error_type}: {result.error_message or ''}"
    else:
        error = str(event.details.get("error", event.event_type.value))
    return Failure(
        task_id=event.task_id,
        queue=event.queue,
        func=func,
        outcome=event.event_type.value,
        at=event.timestamp,
        attempt=event.attempt,
        error=redact(error)[:500],
    )


def _func_from_events(events: list[TaskEvent]) -> str | None:
    for event in events:
        if event.event_type == EventType.ENQUEUED and "func" in event.details:
            return str(event.details["func"])
    return None


def _task_status(task: Task | None, result: TaskResult | None, events: list[TaskEvent]) -> str:
    if result is not None:
        return result.status.value
    last = events[-1].event_type if events else None
    if last == EventType.STARTED:
        return TaskStatus.RUNNING.value
    if last == EventType.RETRIED or (task is not None and task.eta and task.eta > utcnow()):
        return TaskStatus.SCHEDULED.value
    return TaskStatus.PENDING.value


def _task_view(
    task_id: str, task: Task | None, result: TaskResult | None, events: list[TaskEvent]
) -> TaskView:
    attempts = max((e.attempt for e in events if e.event_type == EventType.STARTED), default=0)
    if result is not None:
        attempts = max(attempts, result.attempts)
    status = _task_status(task, result, events)
    return TaskView(
        task_id=task_id,
        status=status,
        queue=task.queue if task else (result.queue if result else _queue_of(events)),
        func=task.func if task else _func_from_events(events),
        args=list(task.args) if task else None,
        kwargs=dict(task.kwargs) if task else None,
        attempts=attempts,
        max_attempts=task.max_retries + 1 if task else None,
        result=None if result is None else result_record(result),
        events=[event_record(e) for e in events],
        retryable=result is not None and not result.ok and task is not None,
    )


def _queue_of(events: list[TaskEvent]) -> str | None:
    return next((e.queue for e in events if e.queue), None)


# --- plain records (JSON for --json and the dashboard) -----------------------------------------


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def result_record(result: TaskResult) -> dict[str, Any]:
    """A result for people: times as ISO text, errors and tracebacks with secrets masked."""
    return {
        "status": result.status.value,
        "value": result.value if result.ok else None,
        "error_type": result.error_type,
        "error_message": None if result.error_message is None else redact(result.error_message),
        "traceback": None if result.traceback is None else redact(result.traceback),
        "attempts": result.attempts,
        "worker_id": result.worker_id,
        "started_at": iso(result.started_at),
        "finished_at": iso(result.finished_at),
    }


def event_record(event: TaskEvent) -> dict[str, Any]:
    details = {k: redact(v) if isinstance(v, str) else v for k, v in event.details.items()}
    return {
        "task_id": event.task_id,
        "event_type": event.event_type.value,
        "timestamp": iso(event.timestamp),
        "attempt": event.attempt,
        "worker_id": event.worker_id,
        "queue": event.queue,
        "details": details,
    }


def failed_record(info: FailedInfo) -> dict[str, Any]:
    """A dead letter (`omniq failed`, the dashboard's failed list): errors masked."""
    r = info.result
    message = None if r is None or r.error_message is None else redact(r.error_message)
    return {
        "task_id": info.task.id,
        "queue": info.task.queue,
        "func": info.task.func,
        "failed_at": iso(info.failed_at),
        "status": info.status,
        "attempts": None if r is None else r.attempts,
        "error_type": None if r is None else r.error_type,
        "error_message": message,
        "error": redact(info.error),
        "schedule": info.task.schedule,
    }


def schedule_when(schedule: Schedule) -> str:
    """'every 30s', '*/5 * * * * (Europe/Paris)': when a schedule fires, in one phrase."""
    if schedule.every is not None:
        return f"every {duration_text(schedule.every)}"
    return f"{schedule.cron} ({schedule.timezone})"


def duration_text(seconds: float) -> str:
    """30 -> '30s', 300 -> '5m', 7200 -> '2h', 90 -> '90s': a duration as one would type it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def schedule_record(schedule: Schedule, now: datetime | None = None) -> dict[str, Any]:
    """A schedule with its last slot (enqueued by any worker) and its next one (None while
    it is paused)."""
    upcoming = None if schedule.paused else schedule.next_slot(now or utcnow())
    return {
        "name": schedule.name,
        "func": schedule.func,
        "args": list(schedule.args),
        "kwargs": dict(schedule.kwargs),
        "queue": schedule.queue,
        "when": schedule_when(schedule),
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "every": schedule.every,
        "catch_up": schedule.catch_up,
        "catch_up_limit": schedule.catch_up_limit,
        "options": dict(schedule.options),
        "paused": schedule.paused,
        "source": schedule.source,
        "created_at": iso(schedule.created_at),
        "last_slot": iso(schedule.last_slot),
        "next_slot": iso(upcoming),
    }


def record(view: Any) -> dict[str, Any]:
    """A view dataclass as JSON-ready data (datetimes as ISO text)."""
    return _plain(asdict(view))


def overview_record(overview: Overview) -> dict[str, Any]:
    data = record(overview)
    data.update(depth=overview.depth, failed=overview.failed, oldest_wait=overview.oldest_wait,
                live_workers=len(overview.workers))
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --- thresholds (`omniq metrics --max-age 5m`) ------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    max_age: float | None = None  # seconds the oldest ready task may wait
    max_failed: int | None = None  # dead letters kept, all queues together
    max_depth: int | None = None  # ready tasks, all queues together
    min_workers: int | None = None  # live workers

    def crossed(self, overview: Overview) -> list[str]:
        """One sentence per threshold crossed (empty: all is well)."""
        found = []
        for q in overview.queues:
            if self.max_age is not None and (q.oldest_wait or 0.0) > self.max_age:
                found.append(
                    f"queue {q.queue}: the oldest ready task has waited "
                    f"{human_seconds(q.oldest_wait or 0.0)} (more than "
                    f"{human_seconds(self.max_age)})"
                )
        if self.max_failed is not None and overview.failed > self.max_failed:
            found.append(f"{overview.failed} failed tasks kept (more than {self.max_failed})")
        if self.max_depth is not None and overview.depth > self.max_depth:
            found.append(f"{overview.depth} tasks ready to run (more than {self.max_depth})")
        if self.min_workers is not None and len(overview.workers) < self.min_workers:
            found.append(f"{len(overview.workers)} live workers (fewer than {self.min_workers})")
        return found


def human_seconds(seconds: float) -> str:
    """'42s', '5m12s', '3h04m': an age for people."""
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
