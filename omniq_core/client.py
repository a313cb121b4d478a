"""The Python API: `AsyncOmniQ` (the core) and `OmniQ` (its synchronous facade)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from omniq import operate, serialization
from omniq.errors import (
    ConfigError,
    OmniQError,
    ResultTimeout,
    TaskCancelled,
    TaskExpired,
    TaskFailed,
    TaskNotFound,
    TaskStateError,
    TaskTimeout,
)
from omniq.models import (
    EventFilter,
    EventType,
    QueueStats,
    Task,
    TaskEvent,
    TaskKind,
    TaskResult,
    TaskStatus,
    WorkerInfo,
    check_queue_name,
    is_valid_id,
    new_task_id,
    utcnow,
)
from omniq.storage import EventStorage, ResultStorage, TaskQueue, follow_events, fused_ops

if TYPE_CHECKING:
    from omniq.config import OmniQConfig
    from omniq.schedules import Schedule
    from omniq.worker import Worker, WorkerSettings

log = logging.getLogger("omniq")
FIRST_WAIT = 0.5  # seconds a wait runs before it checks that the task exists
T = TypeVar("T")


@dataclass(frozen=True)
class TaskOptions:
    """How to run one task; kept apart from the task's own keyword arguments."""

    queue: str | None = None
    delay: float | timedelta | None = None  # run no sooner than this from now
    eta: datetime | None = None  # run no sooner than this time (aware)
    priority: int = 0  # higher runs first
    retries: int | None = None
    retry_delay: float | None = None
    timeout: float | None = None  # seconds per attempt
    ttl: float | None = None  # expire if no worker started it within this
    result_ttl: float | None = None
    unique_key: str | None = None
    # How long the key stays held after the task finished; None: as long as its result
    # is kept (result_ttl), so a key such as "nightly-2030-01-31" runs once. 0: only
    # while the task is unfinished.
    unique_ttl: float | None = None
    # Run only once all these tasks completed; if one fails, is cancelled or expires,
    # this one fails with "dependency failed". `pass_result`: the first one's result
    # comes in as this task's first argument.
    after: Sequence[str] = ()
    pass_result: bool = False


Call = tuple[Any, ...]  # (func,), (func, args), (func, args, kwargs)
_PREFIX = {"queue": "task_queue", "results": "result_storage", "events": "event_storage"}


def _seconds(value: float | timedelta | None) -> float | None:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


def raise_for_result(result: TaskResult) -> Any:
    """The task's value, or the exception that stands for its outcome."""
    if result.status == TaskStatus.COMPLETED:
        return result.value
    kind = {
        TaskStatus.TIMEOUT: TaskTimeout,
        TaskStatus.CANCELLED: TaskCancelled,
        TaskStatus.EXPIRED: TaskExpired,
    }.get(result.status, TaskFailed)
    raise kind(
        result.task_id,
        result.status.value,
        result.error_type,
        result.error_message,
        result.traceback,
    )


class AsyncOmniQ:
    """Enqueue tasks and read their outcomes; optionally run an embedded worker."""

    def __init__(
        self,
        config: OmniQConfig | None = None,
        *,
        task_queue: TaskQueue | None = None,
        result_storage: ResultStorage | None = None,
        event_storage: EventStorage | None = None,
        embedded_worker: str | None = None,
    ) -> None:
        if config is None:
            from omniq.config import OmniQConfig

            config = OmniQConfig()
        self.config = config
        self.embedded_worker = _embedded_mode(embedded_worker or config.embedded_worker)
        self._given = (task_queue, result_storage, event_storage)
        self._run_own_here = False  # inside `async with` in "own" mode
        self._enqueued_modules: set[str] = set()  # modules this client enqueued from
        self._opened: dict[str, Any] = {}
        self._local_queue: TaskQueue | None = None
        self._local_functions: dict[str, Callable[..., Any]] = {}
        self._local_tokens: dict[int, str] = {}
        self._local_lock = threading.Lock()  # the sync API builds tasks on callers' threads
        self._workers: dict[str, tuple[Worker, asyncio.Task[int]]] = {}
        self._open_lock: asyncio.Lock | None = None

    # --- lifecycle ---------------------------------------------------------
    async def open(self) -> None:
        """Open all three stores (calls below open only the stores they use)."""
        for role in _PREFIX:
            await self._store(role)

    async def _store(self, role: str) -> Any:
        """The store of `role`, built and opened on first use."""
        store = self._opened.get(role)
        if store is not None:
            return store
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if role not in self._opened:
                self._opened[role] = await self._build_store(role)
        return self._opened[role]

    async def _build_store(self, role: Any) -> Any:
        from omniq import registry

        store: Any = self._given[list(_PREFIX).index(role)]
        if store is None:
            kind, settings = self.config.store(_PREFIX[role])
            store = registry.create(kind, role, settings)
        if role == "events" and self.config.event_policy == "buffer":
            from omniq.eventbuffer import BufferedEventStorage

            store = BufferedEventStorage(
                store,
                self.config.home_dir / "spill",
                memory_limit=self.config.event_buffer_size,
                spill_limit=self.config.event_spill_max_mb * 2**20,
            )
        await store.open()
        return store

    async def close(self, drain: bool = True) -> None:
        """Stop embedded workers (running tasks finish first when `drain`) and close stores."""
        if drain:
            await self._drain_local()
        for worker, _ in self._workers.values():
            worker.request_stop(force=not drain)
        await asyncio.gather(*(t for _, t in self._workers.values()), return_exceptions=True)
        self._workers.clear()
        stores, self._opened = self._opened, {}
        for store in stores.values():
            with contextlib.suppress(Exception):
                await store.close()

    async def __aenter__(self) -> AsyncOmniQ:
        """Open the stores and run the embedded worker the `embedded_worker` mode asks for:
        "own" (default) runs the tasks this process enqueues, in this process; "shared"
        also works the shared queues like a daemon; "off" runs only local callables."""
        await self.open()
        if self.embedded_worker == "own":
            self._run_own_here = True
            await self._local()
        elif self.embedded_worker == "shared":
            await self.start_worker()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def is_open(self) -> bool:
        return bool(self._opened)

    @property
    def queue(self) -> TaskQueue:
        return self._require("queue")

    @property
    def results(self) -> ResultStorage:
        return self._require("results")

    @property
    def events(self) -> EventStorage:
        return self._require("events")

    async def _q(self) -> TaskQueue:
        return await self._store("queue")

    async def _r(self) -> ResultStorage:
        return await self._store("results")

    async def _e(self) -> EventStorage:
        return await self._store("events")

    def _require(self, role: str) -> Any:
        store = self._opened.get(role)
        if store is None:
            raise OmniQError("AsyncOmniQ is not open: use `async with AsyncOmniQ()` or open()")
        return store

    # --- embedded workers ----------------------------------------------------
    def worker_settings(self, **overrides: Any) -> WorkerSettings:
        from omniq.worker import settings_from_config

        return settings_from_config(self.config, **overrides)

    async def start_worker(self, **overrides: Any) -> Worker:
        """Run a worker on the shared queues inside this process, like `omniq worker`.

        It runs what the `task_modules` allow-list allows; with none configured, only
        functions of modules this client enqueued from (never anything else another
        process put on a shared queue). Keyword arguments override the worker settings
        (queues=, concurrency=, ...); each distinct set starts its own worker.
        """
        await self.open()
        name = "shared:" + repr(sorted(overrides.items()))
        if name in self._workers:
            return self._workers[name][0]
        overrides.setdefault("allowed_modules", tuple(self.config.task_modules))
        # A short poll keeps `with OmniQ()` quick to close.
        overrides.setdefault("poll_interval", min(0.2, self.config.worker_poll_interval))
        settings = self.worker_settings(**overrides)
        also = None if self.config.task_modules else self._enqueued_modules
        return self._spawn_worker(name, self.queue, settings, also_allowed=also)

    def _spawn_worker(
        self,
        name: str,
        queue: TaskQueue,
        settings: WorkerSettings,
        also_allowed: set[str] | None = None,
    ) -> Worker:
        from omniq.worker import Worker

        worker = Worker(
            queue, self.results, self.events, settings, local_functions=self._local_functions,
            also_allowed=also_allowed,
        )
        task = asyncio.create_task(worker.run(), name=f"omniq-{name}-worker")
        task.add_done_callback(_log_worker_crash)
        self._workers[name] = (worker, task)
        return worker

    async def _local(self) -> TaskQueue:
        """Tasks that run in this process only, off a private queue: callables other
        processes cannot import, and in "own" mode everything this process enqueues."""
        await self._r()
        await self._e()
        if self._local_queue is None:
            from omniq.backends.memory import MemoryQueue

            # Every lane: a local task runs whatever queue it was given (queue="mail").
            self._local_queue = MemoryQueue(any_lane=True)
        if "local" not in self._workers:
            # Own tasks obey the allow-list when one is configured; local callables are
            # this process's own code and always run.
            allowed = tuple(self.config.task_modules) or None
            settings = self.worker_settings(
                allowed_modules=allowed, register=False, poll_interval=0.5
            )
            self._spawn_worker("local", self._local_queue, settings)
        return self._local_queue

    async def _drain_local(self) -> None:
        """Local tasks cannot run anywhere else: give them time to finish before closing."""
        if self._local_queue is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.worker_shutdown_timeout
        while loop.time() < deadline:
            stats = await self._local_queue.stats()
            if not any(s.queued or s.running for s in stats):
                return
            await asyncio.sleep(0.01)
        log.warning("closing with local tasks still waiting; they will not run")

    # --- enqueue -------------------------------------------------------------
    async def enqueue(self, func: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> str:
        """Queue `func(*args, **kwargs)`; every keyword goes to `func` (see `options`)."""
        return await self.enqueue_call(func, args, kwargs)

    def options(self, **options: Any) -> BoundOptions:
        """`await omniq.options(queue="mail", delay=30).enqueue(send, to)`."""
        return BoundOptions(self, TaskOptions(**options))

    async def enqueue_call(
        self,
        func: Callable[..., Any] | str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        options: TaskOptions | None = None,
    ) -> str:
        task = self.build_task(func, tuple(args), dict(kwargs or {}), options or TaskOptions())
        return await self.submit(task)

    async def enqueue_many(
        self, calls: Iterable[Call], options: TaskOptions | None = None
    ) -> list[str]:
        """Queue many calls given as (func, args, kwargs) tuples; returns their ids in order."""
        opts = options or TaskOptions()
        tasks = [self.build_task(*_unpack_call(c), opts) for c in calls]
        return await self.submit_many(tasks)

    async def chain(
        self, *calls: Call, pass_results: bool = False, options: TaskOptions | None = None
    ) -> list[str]:
        """Enqueue calls that run one after another: each waits for the one before
        (`after=`) and fails if it did not complete; with `pass_results` each gets the
        previous one's result as its first argument. Returns the ids in order."""
        ids: list[str] = []
        for call in calls:
            func, args, kwargs = _unpack_call(call)
            opts = options or TaskOptions()
            if ids:
                opts = replace(opts, after=(ids[-1],), pass_result=pass_results)
            ids.append(await self.enqueue_call(func, args, kwargs, opts))
        return ids

    def build_task(
        self,
        func: Callable[..., Any] | str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: TaskOptions,
    ) -> Task:
        serialization.check_arguments(args, kwargs)
        cfg = self.config
        queue = options.queue or cfg.default_queue
        check_queue_name(queue)
        now = utcnow()
        delay = _seconds(options.delay)
        eta = options.eta or (now + timedelta(seconds=delay) if delay else None)
        ttl = options.ttl if options.ttl is not None else cfg.default_task_ttl
        return Task(
            func=self._func_ref(func),
            args=args,
            kwargs=kwargs,
            queue=queue,
            priority=options.priority,
            eta=eta,
            max_retries=options.retries if options.retries is not None else cfg.default_retries,
            retry_delay=options.retry_delay
            if options.retry_delay is not None
            else cfg.default_retry_delay,
            timeout=options.timeout if options.timeout is not None else cfg.default_timeout,
            expires_at=(eta or now) + timedelta(seconds=ttl) if ttl else None,
            unique_key=options.unique_key,
            unique_ttl=self._unique_ttl(options),
            result_ttl=options.result_ttl,
            created_at=now,
            after=self._checked_after(options),
            pass_result=options.pass_result,
        )

    @staticmethod
    def _checked_after(options: TaskOptions) -> tuple[str, ...]:
        after = tuple(options.after)
        for task_id in after:
            if not is_valid_id(task_id):
                raise ValueError(f"after: {task_id!r} is not a task id")
        if options.pass_result and not after:
            raise ValueError("pass_result needs after=[the task whose result to pass]")
        return after

    def _unique_ttl(self, options: TaskOptions) -> float | None:
        if options.unique_key is None:
            return None
        if options.unique_ttl is not None:
            return options.unique_ttl
        return options.result_ttl if options.result_ttl is not None else self.config.result_ttl

    def _func_ref(self, func: Callable[..., Any] | str) -> str:
        path = self._func_path(func)
        if not path.startswith("local:"):
            self._enqueued_modules.add(serialization.module_of(path))
        return path

    def _func_path(self, func: Callable[..., Any] | str) -> str:
        if isinstance(func, str):
            if func.startswith("local:"):
                raise ValueError("local callables are enqueued by passing the function itself")
            serialization.module_of(func)  # shape check only; the worker imports it
            if ":" not in func and "." not in func:
                raise ValueError(f"{func!r} is not an import path like 'package.module:function'")
            return func
        if not callable(func):
            raise TypeError(f"{func!r} is not callable")
        path = serialization.callable_path(func)
        return path if path is not None else self._register_local(func)

    def _register_local(self, func: Callable[..., Any]) -> str:
        with self._local_lock:
            token = self._local_tokens.get(id(func))
            if token is None:
                name = getattr(func, "__qualname__", type(func).__name__)
                number = len(self._local_tokens) + 1
                token = f"local:{getattr(func, '__module__', '?')}.{name}#{number}"
                self._local_tokens[id(func)] = token
                self._local_functions[token] = func
            return token

    def _runs_here(self, task: Task) -> bool:
        return task.is_local or self._run_own_here

    async def submit(self, task: Task) -> str:
        """Write the task and its ENQUEUED event (which sorts before anything else of
        the task): one round trip when one Backend holds both stores."""
        queue = await self._local() if self._runs_here(task) else await self._q()
        events = await self._e()
        event = _enqueued_event(task)
        fused = fused_ops(queue, events)
        if fused is not None:
            return await fused.submit(task, event)
        if task.unique_key is not None:  # a duplicate must not leave an event behind
            task_id = await queue.enqueue(task)
            if task_id == task.id:
                await events.append(event)
            return task_id
        if self.config.event_policy == "strict":  # an event write that fails stops it
            await events.append(event)
            return await queue.enqueue(task)
        # The event goes out first, the task right behind it without waiting: a worker
        # can only write STARTED after claiming the task, a round trip later.
        sent = asyncio.ensure_future(events.append(event))
        await asyncio.sleep(0)
        try:
            return await queue.enqueue(task)
        finally:
            await sent

    def submit_blocking(self, task: Task) -> str | None:
        """`submit` on the calling thread, blocking, where the store can answer a thread
        directly (SQLite's fused submit; the sync `OmniQ` uses it): None where it cannot
        (stores not open yet, a task that runs in this process, other technologies)."""
        queue, events = self._opened.get("queue"), self._opened.get("events")
        if queue is None or events is None or self._runs_here(task):
            return None
        blocking = getattr(fused_ops(queue, events), "submit_blocking", None)
        if blocking is None:
            return None
        task_id: str = blocking(task, _enqueued_event(task))
        return task_id

    async def submit_many(self, tasks: Sequence[Task]) -> list[str]:
        """Like `submit` for many tasks: their ENQUEUED events go out in one write
        (or, on one Backend, the fused writes go out together)."""
        queue, events = await self._q(), await self._e()
        if fused_ops(queue, events) is not None:
            return list(await asyncio.gather(*(self.submit(t) for t in tasks)))
        plain = {t.id for t in tasks if t.unique_key is None and not self._runs_here(t)}
        if plain:
            await events.append_many([_enqueued_event(t) for t in tasks if t.id in plain])
        return [
            await queue.enqueue(t) if t.id in plain else await self.submit(t) for t in tasks
        ]

    # --- outcomes ------------------------------------------------------------
    async def get_result(self, task_id: str, timeout: float | None = None) -> Any:
        """The task's return value. Waits `timeout` seconds (None: until done, 0: not at all).

        Raises TaskFailed (or TaskTimeout/TaskCancelled/TaskExpired) carrying the remote
        error, ResultTimeout while it is still pending, TaskNotFound for an unknown id.
        """
        return raise_for_result(await self.wait_result(task_id, timeout))

    async def wait_result(self, task_id: str, timeout: float | None = None) -> TaskResult:
        if not is_valid_id(task_id):  # e.g. a NUL: no store could hold it
            raise TaskNotFound(f"no task with id {task_id!r}")
        results = await self._r()
        if timeout is not None and timeout <= 0:
            result = await results.get(task_id)
            if result is not None:
                return result
            if not await self.task_exists(task_id):
                raise TaskNotFound(f"no task with id {task_id}")
            raise ResultTimeout(f"task {task_id} has no result yet")
        # Wait first: most waits are for a task that exists and ends soon, and a wait
        # already reads once (a subscribe and one read where results are pushed).
        first = FIRST_WAIT if timeout is None else min(timeout, FIRST_WAIT)
        result = await results.wait(task_id, first)
        if result is not None:
            return result
        if not await self.task_exists(task_id):  # an unknown id never waits long
            raise TaskNotFound(f"no task with id {task_id}")
        rest = None if timeout is None else timeout - first
        if rest is None or rest > 0:
            result = await results.wait(task_id, rest)
        if result is None:
            raise ResultTimeout(f"task {task_id} has no result after {timeout:g}s")
        return result

    async def task_exists(self, task_id: str, *, enqueued_event_counts: bool = True) -> bool:
        """Queued, running, finished or failed, or known by its events. Without
        `enqueued_event_counts`, an ENQUEUED event alone is not enough: its producer may
        have died before the task was written (a schedule's half-fired slot)."""
        if not is_valid_id(task_id):
            return False
        if self._local_queue is not None and await self._local_queue.get_task(task_id):
            return True
        if await (await self._q()).get_task(task_id) is not None:
            return True
        if await (await self._r()).get(task_id) is not None:
            return True
        events = await (await self._e()).get(task_id)
        if enqueued_event_counts:
            return bool(events)
        return any(e.event_type is not EventType.ENQUEUED for e in events)

    async def get_events(self, task_id: str) -> list[TaskEvent]:
        if not is_valid_id(task_id):
            return []
        events = await self._e()
        return await events.get(task_id)

    async def follow_events(
        self,
        after: str | None = "now",
        filters: EventFilter | None = None,
        idle_wait: float = 1.0,
    ) -> AsyncGenerator[tuple[str, TaskEvent], None]:
        """Live events of all tasks as (cursor, event).

        `after` is "now", None (from the oldest) or a cursor from an earlier event.
        "now" is taken at the first iteration; to fix it earlier, pass `await
        omniq.event_cursor()`.
        """
        events = await self._e()
        start = await events.last_cursor() if after == "now" else after
        async for item in follow_events(events, start, filters, idle_wait=idle_wait):
            yield item

    async def event_cursor(self) -> str | None:
        """The cursor of the newest event: follow from here to see only what comes next."""
        events = await self._e()
        return await events.last_cursor()

    # --- operations ----------------------------------------------------------
    async def cancel(self, task_id: str, *, kill: bool = False, wait: float = 10.0) -> bool:
        """Cancel a task, waiting or running; True once it ended cancelled. A running
        task is asked to stop (see `cancel_task`)."""
        try:
            outcome = await self.cancel_task(task_id, kill=kill, wait=wait)
        except TaskNotFound:
            return False
        return outcome in (operate.BEFORE, operate.WHILE_RUNNING)

    async def cancel_task(self, task_id: str, *, kill: bool = False, wait: float = 10.0) -> str:
        """Cancel a task and say how it went: "cancelled before it ran", "cancelled
        while running", "had already finished", or (no worker confirmed within `wait`
        seconds) "cancel requested ...". A running async task gets CancelledError; a sync
        task sees `omniq.current_task().cancelled`; a process-pool child is killed
        after the worker's grace period (`kill=True`: at once)."""
        return await operate.cancel(self, task_id, kill=kill, wait=wait)

    async def cancel_waiting(self, task_id: str) -> bool:
        """Cancel a task no worker has started; records a CANCELLED outcome."""
        if not is_valid_id(task_id):
            return False
        for queue in (self._local_queue, await self._q()):
            if queue is None:
                continue
            task = await queue.get_task(task_id)
            if task is not None and await queue.cancel(task_id):
                await self._record_cancel(task)
                return True
        return False

    async def _record_cancel(self, task: Task) -> None:
        ttl = task.result_ttl if task.result_ttl is not None else self.config.result_ttl
        now = utcnow()
        results, events = await self._r(), await self._e()
        await results.store(
            TaskResult(
                task_id=task.id,
                status=TaskStatus.CANCELLED,
                error_type="Cancelled",
                error_message="cancelled before it started",
                attempts=0,
                queue=task.queue,
                enqueued_at=task.created_at,
                finished_at=now,
                expires_at=now + timedelta(seconds=ttl) if ttl else None,
            )
        )
        await events.append(
            TaskEvent(task_id=task.id, event_type=EventType.CANCELLED, queue=task.queue)
        )

    async def retry(self, task_id: str) -> str:
        """Run a failed task again, under the same id; returns the id.

        Idempotent: a task already queued again (or running) is left alone. The failed
        outcome is deleted first, so the new attempt's outcome can be stored (the
        first final outcome wins).
        """
        results = await self._r()
        result = await results.get(task_id) if is_valid_id(task_id) else None
        if result is not None and result.ok:
            raise TaskStateError(
                f"task {task_id} has not failed; only failed tasks can be retried"
            )
        found = await self._find_task(task_id)
        if found is None:
            raise TaskNotFound(f"no failed task kept for id {task_id} (only dead letters retry)")
        queue, task = found
        if task.func == serialization.UNDECODABLE_FUNC:
            raise TaskStateError(
                f"task {task_id} cannot run again: its stored payload is undecodable"
            )
        if result is None:  # queued again already (or running): enqueue is a no-op then
            await queue.enqueue(task)
            return task_id
        await results.delete(task_id)
        event = replace(_enqueued_event(task), timestamp=utcnow())
        event.details["retry"] = True
        await (await self._e()).append(event)
        await queue.enqueue(replace(task, eta=None, expires_at=None))
        return task_id

    async def _find_task(self, task_id: str) -> tuple[TaskQueue, Task] | None:
        """The queue holding the task (this process's private one first) and the task."""
        if not is_valid_id(task_id):
            return None
        for queue in (self._local_queue, await self._q()):
            if queue is not None:
                task = await queue.get_task(task_id)
                if task is not None:
                    return queue, task
        return None

    # --- failed tasks, schedules (omniq.operate) -------------------------------------
    async def failed(
        self,
        queue: str | None = None,
        since: datetime | None = None,
        func: str | None = None,
        limit: int | None = 50,
    ) -> list[operate.FailedInfo]:
        """Failed tasks (dead letters), newest first, with their errors; `func` is a
        glob over the function's import path or name."""
        return await operate.failed(self, queue, since, func, limit)

    async def retry_failed(
        self,
        queue: str | None = None,
        since: datetime | None = None,
        func: str | None = None,
        *,
        dry_run: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """Run every matching failed task again (each under its own id); their ids."""
        return await operate.retry_failed(
            self, queue, since, func, dry_run=dry_run, progress=progress
        )

    async def purge_failed(
        self,
        queue: str | None = None,
        since: datetime | None = None,
        func: str | None = None,
        *,
        dry_run: bool = False,
    ) -> list[str]:
        """Delete every matching failed task; their ids."""
        return await operate.purge_failed(self, queue, since, func, dry_run=dry_run)

    async def schedules(self) -> list[Schedule]:
        return await operate.schedules(self)

    async def get_schedule(self, name: str) -> Schedule:
        return await operate.get_schedule(self, name)

    async def add_schedule(self, schedule: Schedule, *, replace: bool = False) -> None:
        await operate.add_schedule(self, schedule, replace_=replace)

    async def pause_schedule(self, name: str) -> Schedule:
        return await operate.set_paused(self, name, True)

    async def resume_schedule(self, name: str) -> Schedule:
        return await operate.set_paused(self, name, False)

    async def remove_schedule(self, name: str) -> None:
        await operate.remove_schedule(self, name)

    async def run_schedule_now(self, name: str) -> str:
        return await operate.run_now(self, name)

    async def fire_schedules(self, now: datetime | None = None) -> list[str]:
        """Enqueue the due slots of every schedule (what workers do every second)."""
        return await operate.fire_schedules(self, now)

    async def stats(self) -> list[QueueStats]:
        queue = await self._q()
        return await queue.stats()

    async def workers(self) -> list[WorkerInfo]:
        queue = await self._q()
        return await queue.workers()

    async def purge(
        self,
        *,
        results_older_than: float | None = None,
        events_older_than: float | None = None,
        expired: bool = False,
        queue: str | None = None,
        all_queues: bool = False,
    ) -> dict[str, int]:
        """Delete old results/events and/or waiting tasks; returns counts by kind."""
        now = utcnow()
        counts: dict[str, int] = {}
        if results_older_than is not None or expired:
            before = None
            if results_older_than is not None:
                before = now - timedelta(seconds=results_older_than)
            results = await self._r()
            counts["results"] = await results.cleanup(now, finished_before=before)
        if events_older_than is not None:
            before = now - timedelta(seconds=events_older_than)
            events = await self._e()
            counts["events"] = await events.cleanup(before)
        if queue is not None or all_queues:
            store = await self._q()
            counts["tasks"] = await store.purge(None if all_queues else queue)
        return counts

    async def check(self) -> dict[str, str | None]:
        """Try each configured store: role -> None when reachable, else the error."""
        from omniq import registry

        report: dict[str, str | None] = {}
        for role, prefix in zip(
            registry.ROLES, ("task_queue", "result_storage", "event_storage"), strict=True
        ):
            report[role] = await _probe(self.config, prefix, role)
        return report


async def _probe(config: OmniQConfig, prefix: str, role: Any) -> str | None:
    from omniq import registry

    try:
        kind, settings = config.store(prefix)
        store = registry.create(kind, role, settings)
        await asyncio.wait_for(store.open(), 15)
        try:
            probe = {
                "queue": lambda: store.stats(),
                "results": lambda: store.get(new_task_id()),
                "events": lambda: store.last_cursor(),
            }[role]
            await asyncio.wait_for(probe(), 15)
        finally:
            await store.close()
    except TimeoutError:
        return "timed out after 15s"
    except ConfigError:
        raise  # a bad setting is not an outage: the caller reports it as such (exit 78)
    except OmniQError as exc:
        return str(exc)
    return None


EMBEDDED_MODES = ("own", "shared", "off")


def _embedded_mode(mode: str) -> str:
    if mode not in EMBEDDED_MODES:
        raise ConfigError(
            f"embedded_worker must be one of {', '.join(EMBEDDED_MODES)}, not {mode!r}"
        )
    return mode


def _enqueued_event(task: Task) -> TaskEvent:
    return TaskEvent(
        task_id=task.id,
        event_type=EventType.ENQUEUED,
        timestamp=task.created_at,
        queue=task.queue,
        details=_enqueue_details(task),
    )


def _enqueue_details(task: Task) -> dict[str, Any]:
    details: dict[str, Any] = {"func": task.func if task.kind == TaskKind.PYTHON else "shell"}
    if task.eta is not None:
        details["eta"] = task.eta.isoformat()
    if task.priority:
        details["priority"] = task.priority
    if task.unique_key:
        details["key"] = task.unique_key
    if task.schedule is not None:
        details["schedule"] = task.schedule
        details["slot"] = task.slot.isoformat() if task.slot else None
    if task.after:
        details["after"] = list(task.after)
    return details


def _unpack_call(call: Call) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    if not isinstance(call, tuple) or not 1 <= len(call) <= 3:
        raise TypeError("enqueue_many takes (func,), (func, args) or (func, args, kwargs) tuples")
    func = call[0]
    args = tuple(call[1]) if len(call) > 1 else ()
    kwargs = dict(call[2]) if len(call) > 2 else {}
    return func, args, kwargs


def _log_worker_crash(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("embedded worker stopped", exc_info=task.exception())


class BoundOptions:
    """`client.options(...)`: enqueue with task options, on the sync or async client."""

    def __init__(self, client: Any, options: TaskOptions) -> None:
        self._client = client
        self._options = options

    def enqueue(self, func: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Any:
        return self._client.enqueue_call(func, args, kwargs, self._options)

    def enqueue_many(self, calls: Iterable[Call]) -> Any:
        return self._client.enqueue_many(calls, self._options)


# --- the synchronous facade -------------------------------------------------


class _LoopThread:
    """A private event loop on a daemon thread, so `OmniQ` works from any context."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="omniq-loop", daemon=True
        )
        self._thread.start()

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise OmniQError("OmniQ (sync) cannot be called from its own loop; use AsyncOmniQ")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


_live: weakref.WeakSet[OmniQ] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    # A script that never closed its OmniQ still exits promptly, its stores flushed.
    for client in list(_live):
        with contextlib.suppress(Exception):
            client.close(drain=False)


class OmniQ:
    """Synchronous API over `AsyncOmniQ`. `with OmniQ() as omniq:` runs an embedded worker."""

    def __init__(
        self,
        config: OmniQConfig | None = None,
        *,
        task_queue: TaskQueue | None = None,
        result_storage: ResultStorage | None = None,
        event_storage: EventStorage | None = None,
        embedded_worker: str | None = None,
    ) -> None:
        self._core = AsyncOmniQ(
            config,
            task_queue=task_queue,
            result_storage=result_storage,
            event_storage=event_storage,
            embedded_worker=embedded_worker,
        )
        self._thread: _LoopThread | None = None
        self._lock = threading.Lock()
        _live.add(self)

    @property
    def config(self) -> OmniQConfig:
        return self._core.config

    @property
    def core(self) -> AsyncOmniQ:
        return self._core

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = _LoopThread()
        return self._thread.call(coro)

    def __enter__(self) -> OmniQ:
        """Open the stores and run the embedded worker (see AsyncOmniQ.__aenter__)."""
        self._run(_enter(self._core))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, drain: bool = True) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with contextlib.suppress(Exception):
            thread.call(self._core.close(drain=drain))
        thread.stop()

    def start_worker(self, **overrides: Any) -> None:
        self._run(_start(self._core, **overrides))

    def enqueue(self, func: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> str:
        return self.enqueue_call(func, args, kwargs)

    def enqueue_call(
        self,
        func: Callable[..., Any] | str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        options: TaskOptions | None = None,
    ) -> str:
        thread = self._thread
        if thread is not None and not thread.is_current():
            # Stores open: the task is built here and, where the store thread can answer
            # this thread itself (SQLite), written without a trip through the loop.
            task = self._core.build_task(func, tuple(args), dict(kwargs or {}),
                                         options or TaskOptions())
            task_id = self._core.submit_blocking(task)
            return task_id if task_id is not None else self._run(self._core.submit(task))
        return self._run(self._core.enqueue_call(func, args, kwargs, options))

    def enqueue_many(self, calls: Iterable[Call], options: TaskOptions | None = None) -> list[str]:
        return self._run(self._core.enqueue_many(list(calls), options))

    def options(self, **options: Any) -> BoundOptions:
        return BoundOptions(self, TaskOptions(**options))

    def get_result(self, task_id: str, timeout: float | None = None) -> Any:
        return self._run(self._core.get_result(task_id, timeout))

    def wait_result(self, task_id: str, timeout: float | None = None) -> TaskResult:
        return self._run(self._core.wait_result(task_id, timeout))

    def get_events(self, task_id: str) -> list[TaskEvent]:
        return self._run(self._core.get_events(task_id))

    def follow_events(
        self, after: str | None = "now", filters: EventFilter | None = None
    ) -> Iterator[TaskEvent]:
        """Yield events of all tasks as they happen (blocks between events).

        "now" means the moment of this call, not of the first `next()`: events of
        tasks enqueued in between are not missed.
        """
        if after == "now":
            after = self._run(self._core.event_cursor())
        return self._follow(after, filters)

    def _follow(self, after: str | None, filters: EventFilter | None) -> Iterator[TaskEvent]:
        agen = self._core.follow_events(after, filters)
        try:
            while True:
                _, event = self._run(_anext(agen))
                yield event
        finally:
            if self._thread is not None:
                with contextlib.suppress(Exception):
                    self._run(agen.aclose())

    def cancel(self, task_id: str, *, kill: bool = False, wait: float = 10.0) -> bool:
        return self._run(self._core.cancel(task_id, kill=kill, wait=wait))

    def cancel_task(self, task_id: str, *, kill: bool = False, wait: float = 10.0) -> str:
        return self._run(self._core.cancel_task(task_id, kill=kill, wait=wait))

    def chain(
        self, *calls: Call, pass_results: bool = False, options: TaskOptions | None = None
    ) -> list[str]:
        return self._run(self._core.chain(*calls, pass_results=pass_results, options=options))

    def failed(
        self,
        queue: str | None = None,
        since: datetime | None = None,
        func: str | None = None,
        limit: int | None = 50,
    ) -> list[operate.FailedInfo]:
        return self._run(self._core.failed(queue, since, func, limit))

    def retry_failed(
        self,
        queue: str | None = None,
        since: datetime | None = None,
        func: str | None = None,
        *,
        dry_run: bool = False,
    ) -> list[str]:
        return self._run(self._core.retry_failed(queue, since, func, dry_run=dry_run))

    def purge_failed(
        self,
        queue: str | None = None,
        since: datetime | None = None,
        func: str | None = None,
        *,
        dry_run: bool = False,
    ) -> list[str]:
        return self._run(self._core.purge_failed(queue, since, func, dry_run=dry_run))

    def schedules(self) -> list[Schedule]:
        return self._run(self._core.schedules())

    def add_schedule(self, schedule: Schedule, *, replace: bool = False) -> None:
        self._run(self._core.add_schedule(schedule, replace=replace))

    def pause_schedule(self, name: str) -> Schedule:
        return self._run(self._core.pause_schedule(name))

    def resume_schedule(self, name: str) -> Schedule:
        return self._run(self._core.resume_schedule(name))

    def remove_schedule(self, name: str) -> None:
        self._run(self._core.remove_schedule(name))

    def run_schedule_now(self, name: str) -> str:
        return self._run(self._core.run_schedule_now(name))

    def retry(self, task_id: str) -> str:
        return self._run(self._core.retry(task_id))

    def stats(self) -> list[QueueStats]:
        return self._run(self._core.stats())

    def workers(self) -> list[WorkerInfo]:
        return self._run(self._core.workers())


async def _start(core: AsyncOmniQ, **overrides: Any) -> None:
    await core.start_worker(**overrides)


async def _enter(core: AsyncOmniQ) -> None:
    await core.__aenter__()


async def _anext(agen: AsyncGenerator[T, None]) -> T:
    return await agen.__anext__()
