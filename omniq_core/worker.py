"""The worker engine: claims tasks, runs them, stores outcomes and events.

Used by the embedded worker of `with OmniQ()` and by the `omniq worker` daemon.
Order of writes for one task: STARTED event (stored before the task's code runs),
run, result stored, outcome event, then ack, so a crash before the ack leads to a
redelivery that finds the result and acks without running again.

Fences: the result store keeps the first final outcome (a conditional create), so a
stalled worker that wakes after its lease was taken over learns that it lost, writes
no outcome event and acks nothing (acks are fenced by the lease too). Attempts are
counted when a lease is taken: a task whose workers vanished on all of its
`retries + 1` attempts is failed (`WorkerLost`) instead of being run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import logging
import os
import random
import socket
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from omniq import serialization
from omniq.context import TaskCancelledError, TaskContext, run_in, set_current
from omniq.context import reset as reset_current
from omniq.errors import (
    BackendUnavailable,
    DependencyFailed,
    SerializationError,
    TaskRefused,
    UndecodableTask,
    WorkerLost,
)
from omniq.models import (
    Delivery,
    EventType,
    Task,
    TaskEvent,
    TaskKind,
    TaskResult,
    TaskStatus,
    WorkerInfo,
    utcnow,
)
from omniq.operate import CANCEL as CANCEL_RECORDS
from omniq.operate import cancel_request
from omniq.storage import (
    EventStorage,
    FusedOps,
    ResultStorage,
    TaskQueue,
    fused_ops,
    started_event,
)
from omniq.threads import TaskThreads

log = logging.getLogger("omniq.worker")
T = TypeVar("T")

ALWAYS_ALLOWED = ("omniq.examples",)
ANNOUNCE_EVERY = 1.0  # seconds: the most often a busy worker re-registers its running tasks
DEPENDENCY_WAIT_FIRST = 0.5  # seconds before a task waiting for others is looked at again
DEPENDENCY_WAIT_MOST = 30.0


@dataclass(frozen=True)
class WorkerSettings:
    queues: tuple[str, ...] = ("default",)
    concurrency: int = 4
    pool: str = "thread"  # thread | async | process
    lease: float = 30.0
    heartbeat: float | None = None  # None = lease / 3
    poll_interval: float = 1.0
    shutdown_timeout: float = 30.0
    retry_backoff: float = 2.0
    retry_max_delay: float = 300.0
    result_ttl: float | None = 7 * 86400.0
    event_ttl: float | None = 7 * 86400.0
    allowed_modules: tuple[str, ...] | None = None  # None = any module (embedded use)
    allow_shell: bool = False
    shell_output_limit: int = 65536
    burst: bool = False
    max_tasks: int | None = None
    cleanup_interval: float = 600.0
    fetchers: int | None = None  # concurrent dequeue calls; None = min(concurrency, 4)
    register: bool = True
    cancel_grace: float = 10.0  # seconds a cancelled process-pool task has before its kill
    cancel_poll: float = 1.0  # seconds between looks for cancel requests while busy

    @property
    def heartbeat_every(self) -> float:
        return self.heartbeat if self.heartbeat else max(0.05, self.lease / 3)


class TaskTimedOut(Exception):
    """Raised by a runner when a task exceeds its timeout."""


def retry_delay(task: Task, attempt: int, settings: WorkerSettings) -> float:
    """Exponential backoff with equal jitter: half fixed, half random."""
    base = task.retry_delay * settings.retry_backoff ** max(0, attempt - 1)
    capped = min(settings.retry_max_delay, base)
    return capped / 2 + random.uniform(0, capped / 2)


def module_allowed(func_path: str, allowed: tuple[str, ...] | None) -> bool:
    if allowed is None:
        return True
    module = serialization.module_of(func_path)
    # A plain name also allows its submodules: "myapp" covers "myapp.tasks".
    return any(
        fnmatch.fnmatchcase(module, p) or module.startswith(p + ".")
        for p in (*ALWAYS_ALLOWED, *allowed)
    )


def refused_message(func_path: str) -> str:
    module = serialization.module_of(func_path)
    return (
        f"refused to run {func_path!r}: module {module!r} is not allowed by task_modules. "
        f"Allow it with `omniq worker --task-modules '{module}'`, "
        f"OMNIQ_TASK_MODULES={module}, or `task_modules: [{module}]` in omniq.yaml"
    )


def describe_error(exc: BaseException) -> tuple[str, str, str]:
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    # A process-pool error carries the child's traceback: that is the one to show.
    tb = getattr(exc, "remote_traceback", None) or "".join(traceback.format_exception(exc))
    return name, str(exc), tb


@dataclass
class _Running:
    delivery: Delivery
    handler: asyncio.Task[None]
    started: float = field(default_factory=time.monotonic)
    finishing: bool = False  # its outcome is being written: a drain must let it end
    context: TaskContext | None = None  # what omniq.current_task() gives the task
    call: asyncio.Future[Any] | None = None  # the task's own run, when it can be cancelled
    cancelled: bool = False  # `omniq cancel` asked it to stop


PROGRESS_GAP = 0.25  # seconds between two progress events of one task, at least
OUTPUT_GAP = 0.5  # seconds between two output events of one shell task, at least
OUTPUT_CHUNK = 8192  # characters in one output event, at most


class _LiveOutput:
    """A shell task's output as events while it runs: batched (one event per stream
    per OUTPUT_GAP, at most OUTPUT_CHUNK characters) and bounded (after `limit`
    characters per stream only the stored result keeps the tail)."""

    def __init__(self, worker: Worker, delivery: Delivery, limit: int) -> None:
        self._worker = worker
        self._delivery = delivery
        self._limit = limit
        self._pending: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._sent = {"stdout": 0, "stderr": 0}
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Future[None]] = set()

    def write(self, stream: str, text: str) -> None:
        if self._sent[stream] >= self._limit or not text:
            return
        self._pending[stream].append(text)
        size = sum(map(len, self._pending[stream]))
        if size >= OUTPUT_CHUNK:
            self._send()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(OUTPUT_GAP, self._send)

    def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for stream, parts in self._pending.items():
            text = "".join(parts)[: self._limit - self._sent[stream]]
            parts.clear()
            if not text:
                continue
            self._sent[stream] += len(text)
            if self._sent[stream] >= self._limit:
                text += "\n[live output stops here; the result keeps the end]\n"
            d = self._delivery
            write = asyncio.ensure_future(self._worker._emit(
                d.task, EventType.OUTPUT, d.attempt, {"stream": stream, "text": text}
            ))
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)

    async def flush(self) -> None:
        self._send()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


class _Progress:
    """Progress events of one task, rate-limited: at most one per PROGRESS_GAP; the
    latest report always gets written (at the latest before the task's outcome)."""

    def __init__(self, worker: Worker, delivery: Delivery) -> None:
        self._worker = worker
        self._delivery = delivery
        self._loop = asyncio.get_running_loop()
        self._latest: tuple[float, float | None, str | None] | None = None
        self._sent_at = float("-inf")
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Future[None]] = set()

    def report(self, done: float, total: float | None, message: str | None) -> None:
        """Thread-safe: called from the task's thread, the loop, or the pool's reader."""
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens
            self._loop.call_soon_threadsafe(self._take, (done, total, message))

    def _take(self, value: tuple[float, float | None, str | None]) -> None:
        self._latest = value
        if self._timer is not None:
            return
        wait = self._sent_at + PROGRESS_GAP - self._loop.time()
        if wait <= 0:
            self._send()
        else:
            self._timer = self._loop.call_later(wait, self._send)

    def _send(self) -> None:
        self._timer = None
        if self._latest is None:
            return
        done, total, message = self._latest
        self._latest = None
        self._sent_at = self._loop.time()
        details: dict[str, Any] = {"done": done}
        if total is not None:
            details["total"] = total
        if message is not None:
            details["message"] = message
        d = self._delivery
        write = asyncio.ensure_future(
            self._worker._emit(d.task, EventType.PROGRESS, d.attempt, details)
        )
        self._writes.add(write)
        write.add_done_callback(self._written)

    def _written(self, write: asyncio.Future[None]) -> None:
        self._writes.discard(write)
        if not write.cancelled() and write.exception() is not None:
            log.debug("a progress event was not written: %s", write.exception())

    async def flush(self) -> None:
        """Write the last report now (before the outcome), and wait for the writes."""
        # Reports made just before the task returned are still on their way to the loop.
        await asyncio.sleep(0)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._send()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


class Worker:
    """Runs tasks from one queue store; results and events go to their stores."""

    def __init__(
        self,
        queue: TaskQueue,
        results: ResultStorage,
        events: EventStorage,
        settings: WorkerSettings | None = None,
        *,
        local_functions: Mapping[str, Callable[..., Any]] | None = None,
        worker_id: str | None = None,
        runner: Any = None,
        observer: Callable[[TaskEvent, Task], None] | None = None,
        also_allowed: Collection[str] | None = None,
    ) -> None:
        self.queue = queue
        self.results = results
        self.events = events
        self.settings = settings or WorkerSettings()
        self.local_functions = local_functions if local_functions is not None else {}
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.started_at = utcnow()
        self.tasks_done = 0
        self.running: dict[str, _Running] = {}
        self._runner = runner
        # Told of every lifecycle event this worker records (metrics); never blocks.
        self._observer = observer
        # Modules allowed besides the allow-list (a live set: an embedded worker with no
        # task_modules runs the modules its own process enqueued from).
        self._also_allowed = also_allowed if also_allowed is not None else ()
        self._stopping = False
        self._force = False
        self._wakeup: asyncio.Event | None = None
        self._threads: TaskThreads | None = None
        self._outage_since: float | None = None  # when the current outage was first seen
        self._handlers: set[asyncio.Task[None]] = set()
        self._resolved: dict[str, Callable[..., Any]] = {}
        self._writer = EventWriter(events, self._resilient)
        self._reserved = 0  # slots promised to claims in flight
        self._fused: FusedOps | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nudge = asyncio.Event()  # set when a slot frees up or a stop is requested
        self._running_changed = asyncio.Event()  # a task started or ended: re-register

    # --- control (thread-safe flags only) -------------------------------
    def request_stop(self, force: bool = False) -> None:
        """Stop taking tasks; `force` also stops waiting for running ones.

        Safe from signal handlers and other threads: it only sets flags and
        schedules a wake-up on the worker's loop.
        """
        self._stopping = True
        self._force = self._force or force
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._nudge.set)

    @property
    def stopping(self) -> bool:
        return self._stopping

    # --- main loop -------------------------------------------------------
    async def run(self) -> int:
        """Work until stopped (or, in burst mode, until the queues are empty)."""
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self._nudge = asyncio.Event()
        self._threads = TaskThreads(self._loop, s.concurrency)
        self._running_changed = asyncio.Event()
        # One Backend holding all three stores: claim + STARTED and result + outcome
        # event + ack each take one round trip.
        self._fused = fused_ops(self.queue, self.results, self.events)
        background = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._announce_loop()),
            asyncio.create_task(self._cancel_loop()),
        ]
        try:
            # A batch claim fills every free slot; a store that claims one task per
            # call gets several calls in flight instead, to hide its round trip.
            fetchers = s.fetchers or (1 if self._batching else min(s.concurrency, 4))
            await asyncio.gather(*(self._fetch_loop() for _ in range(fetchers)))
            await self._finish_running()
            await self._drain()
        finally:
            # Bounded: a duty that swallowed its cancellation (Python 3.11's
            # asyncio.wait_for can, gh-86296) is cancelled once more, then left behind
            # with a warning rather than hanging the worker's shutdown forever.
            pending = set(background)
            for wait in (2.0, 3.0):
                for t in pending:
                    t.cancel()
                _, pending = await asyncio.wait(pending, timeout=wait)
                if not pending:
                    break
            for t in background:
                if t.done() and not t.cancelled():
                    t.exception()  # retrieved: a duty's crash was logged where it happened
                elif not t.done():
                    name = getattr(t.get_coro(), "__qualname__", t.get_name())
                    log.warning("background duty %s did not stop; left behind", name)
            await self._unregister()
            self._threads.shutdown()
        return self.tasks_done

    @property
    def _batching(self) -> bool:
        return self._fused is not None or hasattr(self.queue, "dequeue_many")

    async def _fetch_loop(self) -> None:
        s = self.settings
        backoff = 0.5
        while not self._stopping and not self._reached_max():
            free = await self._wait_for_free_slots()
            if not free:
                break
            limit = free if self._batching else 1
            wait = 0.05 if s.burst and not self.running else s.poll_interval
            self._reserved += limit
            began = time.monotonic()
            try:
                deliveries = await self._claim(limit, wait)
            except BackendUnavailable as exc:
                self._log_outage(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            finally:
                self._reserved -= limit
            backoff = 0.5
            self._outage_over(began)
            if not deliveries:
                if s.burst and not self.running:
                    break
                continue
            if self._stopping:
                for delivery in deliveries:
                    await self._release(delivery)
                break
            for delivery in deliveries:
                self._start_handler(delivery)

    async def _claim(self, limit: int, wait: float) -> list[Delivery]:
        s = self.settings
        if self._fused is not None:
            return await self._fused.claim(s.queues, s.lease, wait, limit, self.worker_id)
        if limit > 1:
            return await self.queue.dequeue_many(s.queues, s.lease, wait, limit)
        delivery = await self.queue.dequeue(s.queues, s.lease, wait)
        return [] if delivery is None else [delivery]

    def _free_slots(self) -> int:
        s = self.settings
        free = s.concurrency - len(self.running) - self._reserved
        if s.max_tasks is not None:
            free = min(free, s.max_tasks - self.tasks_done - len(self.running) - self._reserved)
        return max(0, free)

    async def _wait_for_free_slots(self) -> int:
        """How many slots are free (waiting for one), or 0 once a stop is requested."""
        # Woken by request_stop() too: with every slot busy, a stop must still start
        # the shutdown timeout at once.
        while not self._stopping and not self._reached_max():
            free = self._free_slots()
            if free:
                return free
            self._nudge.clear()
            await self._nudge.wait()
        return 0

    def _start_handler(self, delivery: Delivery) -> None:
        handler = asyncio.create_task(self._handle(delivery))
        self.running[delivery.task_id] = _Running(delivery, handler)
        self._handlers.add(handler)
        self._running_changed.set()

        def done(t: asyncio.Task[None]) -> None:
            self._handlers.discard(t)
            self.running.pop(delivery.task_id, None)
            self._nudge.set()
            self._running_changed.set()

        handler.add_done_callback(done)

    def _reached_max(self) -> bool:
        m = self.settings.max_tasks
        return m is not None and self.tasks_done + len(self.running) + self._reserved >= m

    async def _finish_running(self) -> None:
        """After max_tasks the last tasks run to their end, unless a stop is requested."""
        while self._handlers and not self._stopping:
            await asyncio.wait(set(self._handlers), timeout=0.1)

    async def _drain(self) -> None:
        """Let running tasks finish within the shutdown timeout, then hand the rest back."""
        if not self._handlers:
            return
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while self._handlers and not self._force and time.monotonic() < deadline:
            await asyncio.wait(set(self._handlers), timeout=0.1)
        # A handler writing its outcome is let finish: cancelled between the result write
        # and the ack, its task would be released and run a second time.
        cut = [r for r in self.running.values() if not r.finishing]
        leftovers = [r.delivery for r in cut]
        for running in cut:
            running.handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        for delivery in leftovers:
            await self._release(delivery)
            # Without it the task's events would end at `started`: it would look stuck.
            with contextlib.suppress(Exception):
                await self._emit(delivery.task, EventType.RELEASED, delivery.attempt,
                                 {"reason": "worker shutdown"})
            self._log_task(logging.WARNING, delivery, "released",
                           "released back to its queue at shutdown")

    async def _release(self, delivery: Delivery) -> None:
        with contextlib.suppress(Exception):
            await self.queue.release(delivery)

    # --- one task --------------------------------------------------------
    async def _handle(self, delivery: Delivery) -> None:
        task = delivery.task
        if delivery.problem is not None:
            bad = UndecodableTask(f"undecodable task: {delivery.problem}")
            await self._finish(delivery, None, TaskStatus.FAILED, error=bad)
            return
        if await self._skip_if_settled(delivery):
            return
        if task.after:
            ready = await self._dependencies(delivery)
            if ready is None:
                return
            task = ready
        started_at = utcnow()
        if self._fused is None or task.after:  # (a fused claim stored it with the lease)
            # Stored before the task's code runs: an attempt that began leaves its
            # trace even when the task then kills its worker.
            await self._record(started_event(delivery, self.worker_id), task)
        else:
            self._observe(started_event(delivery, self.worker_id), task)
        progress = _Progress(self, delivery)
        context = self._context(delivery, progress)
        kind, payload = await self._run_task(task, context)
        await progress.flush()
        if self._cancel_asked(task.id):
            await self._forget_cancel(task.id)  # answered, whatever the outcome
        if self._was_cancelled(task.id, kind, payload):
            await self._finish(delivery, started_at, TaskStatus.CANCELLED,
                               error=TaskCancelledError("cancelled while running"))
        elif kind == "ok":
            await self._success(delivery, started_at, payload)
        elif kind == "timeout":
            error = TimeoutError(f"task exceeded its timeout of {task.timeout}s")
            await self._failure(delivery, started_at, error, TaskStatus.TIMEOUT)
        elif kind == "refused":
            await self._finish(delivery, started_at, TaskStatus.FAILED, error=payload)
        else:
            await self._failure(delivery, started_at, payload, TaskStatus.FAILED)

    def _context(self, delivery: Delivery, progress: _Progress) -> TaskContext:
        task = delivery.task
        context = TaskContext(
            task_id=task.id, attempt=delivery.attempt, queue=task.queue, func=task.func,
            schedule=task.schedule, slot=task.slot, _sink=progress.report,
        )
        running = self.running.get(task.id)
        if running is not None:
            running.context = context
        return context

    async def _run_task(self, task: Task, context: TaskContext) -> tuple[str, Any]:
        """Run the callable; its outcome as ("ok", value) or (kind, exception)."""
        try:
            return "ok", await self._execute(task, context)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the worker is stopping: the drain hands the task back
            return "cancelled", None  # `omniq cancel` stopped the task's own run
        except TaskTimedOut:
            return "timeout", None
        except TaskRefused as exc:
            return "refused", exc
        except (Exception, SystemExit) as exc:  # the task's own error, whatever it is
            return "error", exc

    async def _skip_if_settled(self, delivery: Delivery) -> bool:
        task = delivery.task
        if task.expires_at is not None and task.expires_at <= utcnow():
            await self._finish(
                delivery,
                None,
                TaskStatus.EXPIRED,
                error=TaskRefused("task expired before a worker started it"),
            )
            return True
        if delivery.attempt > 1 and self._fused is None:  # (a fused claim checked)
            existing = await self._resilient(lambda: self.results.get(task.id))
            if existing is not None:
                await self._resilient(lambda: self.queue.ack(delivery, failed=not existing.ok))
                return True
        allowed = task.max_retries + 1
        if delivery.attempt > allowed:
            # Every attempt so far began and never ended: its worker vanished (killed,
            # crashed, or the task ended the process). Running it again would loop.
            error = WorkerLost(
                f"worker lost: the worker running attempt {delivery.attempt - 1} vanished "
                f"(its lease ran out) and the task allows {allowed} attempt(s) "
                f"(retries={task.max_retries})"
            )
            await self._finish(
                delivery, None, TaskStatus.FAILED, error=error, attempts=delivery.attempt - 1
            )
            return True
        return False

    async def _success(self, delivery: Delivery, started_at: Any, value: Any) -> None:
        try:
            serialization.check_json(value, "the return value")
        except SerializationError as exc:
            await self._finish(delivery, started_at, TaskStatus.FAILED, error=exc)
            return
        await self._finish(delivery, started_at, TaskStatus.COMPLETED, value=value)

    async def _failure(
        self, delivery: Delivery, started_at: Any, exc: BaseException, status: TaskStatus
    ) -> None:
        task = delivery.task
        if delivery.attempt > task.max_retries:
            await self._finish(delivery, started_at, status, error=exc)
            return
        delay = retry_delay(task, delivery.attempt, self.settings)
        self._mark_finishing(task.id)
        # No RETRIED event from a worker that no longer holds the task: its new holder
        # writes what happens next.
        if not await self._resilient(lambda: self.queue.extend(delivery, self.settings.lease)):
            self._log_lost_lease(delivery, "its retry")
            return
        name, message, _ = describe_error(exc)
        details = {"error": f"{name}: {message}"[:500], "delay": round(delay, 3),
                   "outcome": status.value}
        await self._emit(task, EventType.RETRIED, delivery.attempt, details)
        if not await self._resilient(lambda: self.queue.retry(delivery, delay)):
            self._log_lost_lease(delivery, "its retry")
            return
        self._log_task(
            logging.INFO, delivery, "retried",
            f"{status.value} (attempt {delivery.attempt}), retry in {delay:.1f}s",
        )

    async def _finish(
        self,
        delivery: Delivery,
        started_at: Any,
        status: TaskStatus,
        *,
        value: Any = None,
        error: BaseException | None = None,
        attempts: int | None = None,
    ) -> None:
        task = delivery.task
        self._mark_finishing(task.id)
        result = self._make_result(delivery, started_at, status, value, error, attempts)
        details: dict[str, Any] = {}
        if started_at is not None:
            details["duration"] = round((result.finished_at - started_at).total_seconds(), 6)
        if error is not None:
            details["error"] = f"{result.error_type}: {result.error_message}"[:500]
        event = self._event(task, _EVENT_OF[status], result.attempts, details)
        if not await self._settle(delivery, result, event):
            return
        self.tasks_done += 1
        self._log_outcome(delivery, result, details.get("duration"))

    async def _settle(self, delivery: Delivery, result: TaskResult, event: TaskEvent) -> bool:
        """Store the outcome, its event and the ack; False when another outcome was
        stored first (then it stands, and nothing of ours is written)."""
        failed = not result.ok
        fused = self._fused
        if fused is not None:
            stored = await self._resilient(
                lambda: fused.finish(delivery, result, event, failed=failed)
            )
            if not stored:
                await self._lost_race(delivery, result, acked=True)
            else:
                self._observe(event, delivery.task)
            return stored
        stored = await self._resilient(lambda: self.results.store(result))
        if not stored and not await self._is_own(result):
            await self._lost_race(delivery, result, acked=False)
            return False
        # Independent once the result is stored: the event and the ack go out together.
        await asyncio.gather(
            self._record(event, delivery.task),
            self._resilient(lambda: self.queue.ack(delivery, failed=failed)),
        )
        return True

    async def _is_own(self, result: TaskResult) -> bool:
        """The stored result is this very one: an earlier write whose reply was lost."""
        existing = await self._resilient(lambda: self.results.get(result.task_id))
        return existing == result

    async def _lost_race(self, delivery: Delivery, mine: TaskResult, *, acked: bool) -> None:
        """Another outcome was stored first: it stands. No event; ack only if we still
        hold the task (the fenced ack changes nothing otherwise)."""
        first = await self._resilient(lambda: self.results.get(mine.task_id))
        ok = first.ok if first is not None else mine.ok
        if not acked:
            await self._resilient(lambda: self.queue.ack(delivery, failed=not ok))
        self.tasks_done += 1
        kept = "expired since" if first is None else (
            f"{first.status.value} by {first.worker_id or 'another worker'} "
            f"(attempt {first.attempts})"
        )
        self._log_task(
            logging.WARNING, delivery, "outcome_discarded",
            f"another outcome was stored first ({kept}); this attempt's "
            f"{mine.status.value} outcome is discarded",
        )

    def _log_lost_lease(self, delivery: Delivery, what: str) -> None:
        self._log_task(
            logging.WARNING, delivery, "lease_lost",
            f"lost its lease before {what}; the worker holding it now settles it",
        )

    def _mark_finishing(self, task_id: str) -> None:
        running = self.running.get(task_id)
        if running is not None:
            running.finishing = True

    def _make_result(
        self,
        delivery: Delivery,
        started_at: Any,
        status: TaskStatus,
        value: Any,
        error: BaseException | None,
        attempts: int | None = None,
    ) -> TaskResult:
        task = delivery.task
        finished = utcnow()
        ttl = task.result_ttl if task.result_ttl is not None else self.settings.result_ttl
        err_type = err_msg = tb = None
        if error is not None:
            err_type, err_msg, tb = describe_error(error)
            if isinstance(error, _NO_TRACEBACK):
                tb = None
            if isinstance(error, ShellFailed):
                value = error.output
        return TaskResult(
            task_id=task.id,
            status=status,
            value=value,
            error_type=err_type,
            error_message=err_msg,
            traceback=tb,
            attempts=delivery.attempt if attempts is None else attempts,
            queue=task.queue,
            worker_id=self.worker_id,
            enqueued_at=None if delivery.problem else task.created_at,
            started_at=started_at,
            finished_at=finished,
            expires_at=None if ttl is None else finished + timedelta(seconds=ttl),
        )

    def _log_outcome(self, delivery: Delivery, result: TaskResult, duration: float | None) -> None:
        took = f" in {_human_duration(duration)}" if duration is not None else ""
        if result.ok:
            self._log_task(logging.INFO, delivery, "completed", f"completed{took}",
                           duration=duration)
        else:
            self._log_task(
                logging.WARNING, delivery, result.status.value,
                f"{result.status.value}{took}: {result.error_type}: {result.error_message}",
                duration=duration,
            )

    def _log_task(
        self,
        level: int,
        delivery: Delivery,
        event: str,
        text: str,
        duration: float | None = None,
    ) -> None:
        """One log line about a task: `task ID func@queue TEXT`, with the same facts as
        fields for --log-format json."""
        task = delivery.task
        name = task_label(task)
        fields = {
            "task_id": task.id, "func": name, "queue": task.queue,
            "attempt": delivery.attempt, "worker": self.worker_id, "event": event,
        }
        if duration is not None:
            fields["duration"] = duration
        log.log(level, "task %s %s@%s %s", task.id, name, task.queue, text, extra=fields)

    def _event(
        self, task: Task, kind: EventType, attempt: int, details: dict[str, Any] | None = None
    ) -> TaskEvent:
        return TaskEvent(
            task_id=task.id, event_type=kind, attempt=attempt, worker_id=self.worker_id,
            queue=task.queue, details=details or {},
        )

    async def _emit(
        self, task: Task, kind: EventType, attempt: int, details: dict[str, Any] | None = None
    ) -> None:
        await self._record(self._event(task, kind, attempt, details), task)

    async def _record(self, event: TaskEvent, task: Task) -> None:
        """Write one event (group-committed with those of other tasks)."""
        self._observe(event, task)
        await self._writer.submit(event)

    def _observe(self, event: TaskEvent, task: Task) -> None:
        if self._observer is not None:
            try:
                self._observer(event, task)
            except Exception:  # metrics must never cost a task
                log.exception("the worker's observer failed")

    # --- running the callable -------------------------------------------
    async def _execute(self, task: Task, context: TaskContext) -> Any:
        if task.kind == TaskKind.SHELL:
            running = self.running.get(task.id)
            delivery = running.delivery if running else Delivery(task, context.attempt)
            call = asyncio.ensure_future(self._run_shell(task, delivery))
            return await self._cancellable(task.id, call)
        func_path = task.func
        if task.is_local:
            func = self.local_functions.get(task.func)
            if func is None:
                raise TaskRefused(f"local callable {task.func} is not registered in this process")
        else:
            module = serialization.module_of(func_path)
            if module not in self._also_allowed and not module_allowed(
                func_path, self.settings.allowed_modules
            ):
                raise TaskRefused(refused_message(func_path))
            func = None
        if self._runner is not None and func is None:
            fields = {"task_id": context.task_id, "attempt": context.attempt,
                      "queue": context.queue, "func": context.func,
                      "schedule": context.schedule, "slot": context.slot}
            call = asyncio.ensure_future(self._runner.run(task, fields, context.progress))
            return await self._cancellable(task.id, call)
        if func is None:
            func = self._resolved.get(func_path)
        if func is None:
            # The first import may be slow or block: keep it off the loop.
            func = await self._task_threads().run(serialization.resolve, func_path)
            self._resolved[func_path] = func
        return await self._call(func, task, context)

    async def _call(self, func: Callable[..., Any], task: Task, context: TaskContext) -> Any:
        if asyncio.iscoroutinefunction(func):
            # A task copies the context as it is when made: the coroutine runs in one.
            token = set_current(context)
            try:
                coro: Awaitable[Any] = func(*task.args, **task.kwargs)
                if task.timeout is not None:
                    coro = asyncio.wait_for(coro, task.timeout)
                call = asyncio.ensure_future(coro)
            finally:
                reset_current(token)
            return await self._await_task(self._cancellable(task.id, call), task, thread=False)
        coro = self._task_threads().run(run_in, context, func, *task.args, **task.kwargs)
        if task.timeout is not None:
            coro = asyncio.wait_for(coro, task.timeout)
        return await self._await_task(coro, task, thread=True)

    async def _await_task(self, coro: Awaitable[Any], task: Task, *, thread: bool) -> Any:
        try:
            return await coro
        except TimeoutError:
            if task.timeout is None:
                raise  # the task's own TimeoutError: its outcome, not ours
            if thread:
                self._abandon_thread(task)
            raise TaskTimedOut() from None

    def _cancellable(self, task_id: str, call: asyncio.Future[Any]) -> asyncio.Future[Any]:
        running = self.running.get(task_id)
        if running is not None:
            running.call = call
        return call

    def _cancel_asked(self, task_id: str) -> bool:
        running = self.running.get(task_id)
        return running is not None and running.cancelled

    def _was_cancelled(self, task_id: str, kind: str, payload: Any) -> bool:
        running = self.running.get(task_id)
        if running is None or not running.cancelled:
            return False
        if kind == "cancelled" or isinstance(payload, TaskCancelledError):
            return True
        # A killed process-pool child.
        return kind == "error" and type(payload).__name__ == "WorkerProcessDied"

    async def _dependencies(self, delivery: Delivery) -> Task | None:
        """The task to run once every task it depends on completed (with the first one's
        result as its first argument when asked); None when it failed or must wait."""
        task = delivery.task
        found = await self._resilient(lambda: self.results.get_many(list(task.after)))
        for dep in task.after:
            outcome = found.get(dep)
            if outcome is not None and not outcome.ok:
                error = DependencyFailed(
                    f"dependency failed: task {dep} ended {outcome.status.value}"
                )
                await self._finish(delivery, None, TaskStatus.FAILED, error=error, attempts=0)
                return None
        if len(found) < len(task.after):
            # Not all done yet: back to the queue, checked again later (longer for a
            # task that has waited long), its attempt not counted.
            age = (utcnow() - task.created_at).total_seconds()
            delay = min(DEPENDENCY_WAIT_MOST, max(DEPENDENCY_WAIT_FIRST, age / 10))
            self._mark_finishing(task.id)
            await self._resilient(lambda: self.queue.release(delivery, delay))
            return None
        if task.pass_result:
            task = replace(task, args=(found[task.after[0]].value, *task.args))
        return task

    def _abandon_thread(self, task: Task) -> None:
        """A thread cannot be killed: it runs on, so the pool gets a new one."""
        log.warning(
            "task %s is still running in its thread after its timeout; "
            "use --pool process to have timed-out tasks killed", task.id
        )
        self._task_threads().replace_stuck()

    def _task_threads(self) -> TaskThreads:
        if self._threads is None:
            raise RuntimeError("the worker is not running")
        return self._threads

    async def _run_shell(self, task: Task, delivery: Delivery) -> Any:
        if not self.settings.allow_shell:
            raise TaskRefused(
                "refused to run a shell task: this worker was not started with --allow-shell "
                "(or allow_shell: true / OMNIQ_ALLOW_SHELL=1)"
            )
        from omniq.shell import run_shell

        live = _LiveOutput(self, delivery, self.settings.shell_output_limit)
        try:
            outcome = await run_shell(task, self.settings.shell_output_limit, live.write)
        finally:
            await live.flush()
        if outcome is None:
            raise TaskTimedOut()
        if outcome["exit_code"] != 0:
            raise ShellFailed(outcome)
        return outcome

    # --- background duties -----------------------------------------------
    async def _heartbeat_loop(self) -> None:
        every = self.settings.heartbeat_every
        last_cleanup = 0.0
        while True:
            began = time.monotonic()
            try:
                await self._register()
                for running in list(self.running.values()):
                    extended = await self.queue.extend(running.delivery, self.settings.lease)
                    # A task whose outcome is being written (acked meanwhile) has no
                    # lease to keep: not a loss.
                    if not extended and not running.finishing:
                        log.warning(
                            "lost the lease of task %s (another worker may run it)",
                            running.delivery.task_id,
                        )
                if time.monotonic() - last_cleanup > self.settings.cleanup_interval:
                    last_cleanup = time.monotonic()
                    await self._cleanup()
                self._outage_over(began)
            except BackendUnavailable as exc:
                self._log_outage(exc)
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(every)

    async def _cancel_loop(self) -> None:
        """Look for `omniq cancel` requests of running tasks (one store call per
        cancel_poll while busy, none while idle)."""
        while True:
            await asyncio.sleep(self.settings.cancel_poll)
            if not self.running:
                continue
            try:
                requests = await self.queue.list_records(CANCEL_RECORDS)
            except Exception as exc:  # an outage: the heartbeat reports it
                log.debug("could not read cancel requests: %s", exc)
                continue
            for task_id, data in requests:
                request = cancel_request(data)
                running = self.running.get(task_id)
                if running is not None and not running.cancelled:
                    self._cancel_running(running, bool(request.get("kill")))
                elif running is None and _stale(request):
                    await self._forget_cancel(task_id)  # its task ended elsewhere long ago

    def _cancel_running(self, running: _Running, kill: bool) -> None:
        running.cancelled = True
        if running.context is not None:
            running.context._cancel.set()  # a sync task sees current_task().cancelled
        call = running.call
        if call is None:
            return  # a thread cannot be interrupted: the task checks the flag
        grace = 0.0 if kill or self._runner is None else self.settings.cancel_grace
        assert self._loop is not None
        self._loop.call_later(grace, call.cancel)
        self._log_task(logging.INFO, running.delivery, "cancel_requested",
                       "cancel requested" + (f"; killed in {grace:g}s" if grace else ""))

    async def _forget_cancel(self, task_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.queue.delete_record(CANCEL_RECORDS, task_id)

    async def _announce_loop(self) -> None:
        """Re-register when the running set changed, at most once per ANNOUNCE_EVERY:
        `omniq status` shows what runs now, not what ran at the last heartbeat."""
        while True:
            await self._running_changed.wait()
            self._running_changed.clear()
            with contextlib.suppress(Exception):  # the heartbeat reports outages
                await self._register()
            await asyncio.sleep(ANNOUNCE_EVERY)

    async def _cleanup(self) -> None:
        now = utcnow()
        removed = await self.results.cleanup(now)
        if self.settings.event_ttl is not None:
            removed += await self.events.cleanup(now - timedelta(seconds=self.settings.event_ttl))
        if removed:
            log.info("removed %d expired results and events", removed)

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=self.settings.queues,
            started_at=self.started_at,
            current_tasks=tuple(self.running),
            concurrency=self.settings.concurrency,
            tasks_done=self.tasks_done,
            events_buffered=getattr(self.events, "held", 0),
            events_dropped=getattr(self.events, "dropped", 0),
        )

    async def _register(self) -> None:
        if self.settings.register:
            await self.queue.register_worker(self.info(), self.settings.heartbeat_every * 3 + 5)

    async def _unregister(self) -> None:
        if self.settings.register:
            with contextlib.suppress(Exception):
                await self.queue.unregister_worker(self.worker_id)

    # --- outages ---------------------------------------------------------
    def _log_outage(self, exc: BaseException) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.error("store unavailable, retrying with backoff: %s", exc)

    def _outage_over(self, began: float) -> None:
        """`began`: when the call that succeeded started. A call begun before the
        outage was seen may answer without reaching the store: it proves nothing."""
        if self._outage_since is not None and began > self._outage_since:
            self._outage_since = None
            log.warning("store reachable again, carrying on")

    async def _resilient(self, op: Callable[[], Awaitable[T]]) -> T:
        """Retry a store write through an outage: an outcome must not be lost."""
        backoff = 0.2
        while True:
            began = time.monotonic()
            try:
                value = await op()
                self._outage_over(began)
                return value
            except BackendUnavailable as exc:
                if self._force:
                    raise
                self._log_outage(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)


class EventWriter:
    """Group commit for events: what handlers submit while a write is in flight goes
    out together in the next `append_many`. No added delay for a lone event."""

    def __init__(
        self, events: EventStorage, resilient: Callable[[Callable[[], Awaitable[None]]], Any]
    ) -> None:
        self._events = events
        self._resilient = resilient
        self._pending: list[tuple[TaskEvent, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def submit(self, event: TaskEvent) -> asyncio.Future[None]:
        """Queue an event; the future resolves once it is stored."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            events = [event for event, _ in batch]
            try:
                await self._resilient(functools.partial(self._events.append_many, events))
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)


# Outcomes of ours, not of the task's code: their traceback would only show the worker.
_NO_TRACEBACK = (TaskRefused, TimeoutError, WorkerLost, UndecodableTask, DependencyFailed,
                 TaskCancelledError)


STALE_CANCEL = 600.0  # seconds after which a cancel request no worker answered is dropped


def _stale(request: Mapping[str, Any]) -> bool:
    try:
        asked = datetime.fromisoformat(str(request.get("at")))
    except ValueError:
        return True
    return (utcnow() - asked).total_seconds() > STALE_CANCEL


def task_label(task: Task) -> str:
    """How logs name a task's callable: `add` for omniq.examples:add, `shell` for a command."""
    if task.kind == TaskKind.SHELL:
        return "shell"
    return task.func.rpartition(":")[2] or task.func.rpartition(".")[2] or task.func


def _human_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


class ShellFailed(Exception):
    """A shell task exited non-zero; carries exit code, stdout and stderr."""

    def __init__(self, output: dict[str, Any]) -> None:
        self.output = output
        super().__init__(f"command exited with code {output['exit_code']}")


_EVENT_OF = {
    TaskStatus.COMPLETED: EventType.COMPLETED,
    TaskStatus.FAILED: EventType.FAILED,
    TaskStatus.TIMEOUT: EventType.TIMEOUT,
    TaskStatus.EXPIRED: EventType.EXPIRED,
    TaskStatus.CANCELLED: EventType.CANCELLED,
}


def settings_from_config(config: Any, **overrides: Any) -> WorkerSettings:
    """WorkerSettings from an OmniQConfig; keyword overrides win (CLI flags)."""
    values: dict[str, Any] = {
        "queues": tuple(config.worker_queues),
        "concurrency": config.worker_concurrency,
        "pool": config.worker_pool,
        "lease": config.worker_lease_seconds,
        "heartbeat": config.worker_heartbeat_seconds,
        "poll_interval": config.worker_poll_interval,
        "shutdown_timeout": config.worker_shutdown_timeout,
        "retry_backoff": config.default_retry_backoff,
        "retry_max_delay": config.default_retry_max_delay,
        "result_ttl": config.result_ttl,
        "event_ttl": config.event_ttl,
        "allowed_modules": tuple(config.task_modules),
        "allow_shell": config.allow_shell,
        "shell_output_limit": config.shell_output_limit,
        "cancel_grace": config.worker_cancel_grace,
    }
    values.update(overrides)
    return WorkerSettings(**values)
