"""Domain records: Task, TaskResult, TaskEvent and their enums (frozen, store-agnostic)."""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any


class TaskStatus(StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = {
    TaskStatus.COMPLETED,
    TaskStatus.FAILED,
    TaskStatus.TIMEOUT,
    TaskStatus.CANCELLED,
    TaskStatus.EXPIRED,
}


class EventType(StrEnum):
    ENQUEUED = "enqueued"
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"
    RETRIED = "retried"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    EXPIRED = "expired"
    RELEASED = "released"  # handed back unfinished at shutdown; it will run again
    PROGRESS = "progress"  # the task said how far it got (omniq.current_task().progress)
    OUTPUT = "output"  # a shell task's stdout/stderr, as it runs (`omniq logs ID --follow`)


class TaskKind(StrEnum):
    PYTHON = "python"
    SHELL = "shell"


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_timestamp(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def from_timestamp(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


# --- task ids -------------------------------------------------------------
# UUIDv7 layout: 48-bit millisecond clock, then a counter/random tail, so ids
# sort by creation time as plain strings on every backend.
_id_lock = threading.Lock()
_last_ms = 0
_seq = 0
TASK_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def new_task_id() -> str:
    global _last_ms, _seq
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            ms = _last_ms
            _seq += 1
            if _seq >= 1 << 12:
                ms += 1
                _seq = 0
        else:
            _seq = 0
        _last_ms = ms
        seq = _seq
    rand = int.from_bytes(os.urandom(8), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= seq << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def is_task_id(value: str) -> bool:
    return bool(TASK_ID_RE.match(value))


_ANY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,199}$")


def is_valid_id(value: object) -> bool:
    """A task id any store can hold: our UUIDv7s, and plain ids given through the API
    (letters, digits, `_.:=-`). NUL, spaces, slashes and the like are never an id."""
    return isinstance(value, str) and bool(_ANY_ID_RE.match(value))


QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def is_queue_name(value: str) -> bool:
    """Queue names travel into keys, subjects, file names and SQL values: keep them plain."""
    return bool(QUEUE_NAME_RE.match(value))


def check_queue_name(value: str) -> str:
    """`value` when it is a valid queue name, else ValueError saying what is allowed."""
    if not is_queue_name(value):
        raise ValueError(
            f"invalid queue name {value!r}: use letters, digits, '_', '.', '-' "
            "(starting with a letter or digit, at most 100 characters)"
        )
    return value


RECORD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,199}$")


def check_record_name(kind: str, name: str) -> None:
    """Record kinds and names travel into keys, subjects and file names: keep them plain."""
    for what, value in (("kind", kind), ("name", name)):
        if not RECORD_NAME_RE.match(value):
            raise ValueError(f"invalid record {what} {value!r}")


@dataclass(frozen=True)
class Task:
    """One unit of work. `func` is an import path `pkg.mod:qualname` (or a local token)."""

    func: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_task_id)
    queue: str = "default"
    priority: int = 0  # higher runs first
    eta: datetime | None = None  # not before this time
    max_retries: int = 0
    retry_delay: float = 1.0  # base of the exponential backoff, seconds
    timeout: float | None = None  # seconds per attempt
    expires_at: datetime | None = None  # not started by then -> EXPIRED
    unique_key: str | None = None
    # Seconds the unique key stays held after the task finished (None or 0: freed when
    # it finishes), so a key such as "nightly-2030-01-31" runs once, not once at a time.
    unique_ttl: float | None = None
    result_ttl: float | None = None  # seconds; None = store default
    kind: TaskKind = TaskKind.PYTHON
    created_at: datetime = field(default_factory=utcnow)
    schedule: str | None = None  # the schedule that enqueued it
    slot: datetime | None = None  # and for which due time
    after: tuple[str, ...] = ()  # runs once all these tasks completed
    pass_result: bool = False  # gets the result of after[0] as its first argument

    @property
    def is_local(self) -> bool:
        return self.func.startswith("local:")


@dataclass(frozen=True)
class TaskResult:
    """The single outcome of a task: a return value or an error."""

    task_id: str
    status: TaskStatus
    value: Any = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    attempts: int = 1
    queue: str = "default"
    worker_id: str | None = None
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime = field(default_factory=utcnow)
    expires_at: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.status == TaskStatus.COMPLETED

    def is_expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or utcnow())


@dataclass(frozen=True)
class TaskEvent:
    """One lifecycle step of a task. `details` never carries task arguments.

    `id` is chosen by the writer, so a write that is sent again (its reply was lost)
    is stored once: every event store drops a second copy of an id.
    """

    task_id: str
    event_type: EventType
    timestamp: datetime = field(default_factory=utcnow)
    attempt: int = 0
    worker_id: str | None = None
    queue: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_task_id)


@dataclass(frozen=True)
class Delivery:
    """A task handed to one worker under a lease. `receipt` is the backend's token.

    `problem` is set when the stored task could not be decoded (bad bytes, an unknown
    format version, missing fields): `task` is then a placeholder with the real id and
    queue, and the worker records a failed outcome instead of running anything.
    """

    task: Task
    attempt: int  # counted when the lease is taken: 1 on first delivery
    receipt: Any = None
    problem: str | None = None

    @property
    def task_id(self) -> str:
        return self.task.id


@dataclass(frozen=True)
class QueueStats:
    queue: str
    queued: int = 0  # ready to run now
    scheduled: int = 0  # waiting for an ETA or a retry delay
    running: int = 0  # leased to a worker
    failed: int = 0  # kept after the last attempt failed (dead letters)
    # Since when the longest-waiting ready task has been ready (its enqueue, ETA or
    # retry time); None when nothing is ready. What an "oldest wait" alert reads.
    oldest_ready_at: datetime | None = None


@dataclass(frozen=True)
class FailedTask:
    """A dead letter: a task whose last attempt failed, kept until retried or purged."""

    task: Task
    failed_at: datetime


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    started_at: datetime
    heartbeat_at: datetime = field(default_factory=utcnow)
    current_tasks: tuple[str, ...] = ()
    concurrency: int = 1
    tasks_done: int = 0
    events_buffered: int = 0  # held locally while the event store is unreachable
    events_dropped: int = 0  # lost because that buffer was full


@dataclass(frozen=True)
class EventFilter:
    task_id: str | None = None
    event_types: frozenset[EventType] | None = None
    queue: str | None = None

    def matches(self, event: TaskEvent) -> bool:
        if self.task_id is not None and event.task_id != self.task_id:
            return False
        if self.event_types is not None and event.event_type not in self.event_types:
            return False
        return self.queue is None or event.queue == self.queue


def seconds_from_now(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)
