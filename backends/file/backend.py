"""The file Backend: one per place (a directory or an fsspec URL) and process. It owns the
filesystem object and the threads its blocking calls run on; on a local directory it
also holds the maildir queue and the fused operations (omniq.storage.FusedOps), each
one call to one of its threads that does the file operations in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

from omniq.backend import forget_shared, shared
from omniq.errors import CorruptRecord, OmniQError
from omniq.models import Delivery, Task, TaskEvent, TaskResult
from omniq.storage import (
    BlockingRunner,
    EventStorage,
    ResultStorage,
    TaskQueue,
    runs_now,
    started_event,
)

from .common import local_path, signal_for, translate
from .files import Files, connect
from .queue import FileQueue, Maildir, refuse_remote, wait_for_tasks
from .stores import (
    FileEventStorage,
    FileResultStorage,
    Writer,
    append_events,
    get_result,
    store_result,
)

T = TypeVar("T")
B = TypeVar("B", bound="FileBackend")


class FileBackend:
    """Results and events at one place, on any filesystem: one filesystem object, and one
    thread per store role, so a slow fsync of one role never holds up the other."""

    LANES: tuple[str, ...] = ("results", "events")

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        *,
        durable: bool = True,
    ) -> None:
        self.base_dir = os.fspath(base_dir)
        self.storage_options = dict(storage_options or {})
        self.durable = durable
        self.signal = signal_for(local_path(self.base_dir) or self.base_dir)
        self.writer = Writer()  # names the events of every store of this Backend
        self._lanes = {lane: BlockingRunner(f"omniq-file-{lane}") for lane in self.LANES}
        self._files: Files | None = None
        self._files_pid = 0
        self._lock = threading.Lock()
        self._users: set[int] = set()
        self._shared_as: tuple[int, Hashable] | None = None  # (pid, key) when in the cache

    # -- roles --

    def queue(self) -> TaskQueue:
        raise refuse_remote(self.base_dir)

    def results(self) -> ResultStorage:
        return FileResultStorage.on(self)

    def events(self, poll_interval: float = 0.5) -> EventStorage:
        return FileEventStorage.on(self, poll_interval)

    # -- plumbing for the stores --

    def translate(self, exc: BaseException) -> OmniQError | None:
        return translate(exc, self.base_dir)

    def files(self) -> Files:
        """The filesystem, opened on first use (again in a forked child: an fsspec client
        must not outlive its process's IO thread)."""
        with self._lock:
            if self._files is None or self._files_pid != os.getpid():
                self._files = connect(self.base_dir, self.storage_options, self.durable)
                self._files_pid = os.getpid()
            return self._files

    async def run(self, lane: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the thread of `lane`: the one boundary where filesystem and
        driver errors become omniq errors (every file operation passes here)."""
        try:
            return await self._lanes[lane].run(fn, *args)
        except OmniQError:
            raise
        except Exception as exc:
            translated = self.translate(exc)
            if translated is None:
                raise
            raise translated from exc

    async def on_files(self, lane: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(files, *args)` on the thread of `lane`."""
        return await self.run(lane, self._with_files, fn, args)

    def _with_files(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        return fn(self.files(), *args)

    def attach(self, store: object) -> None:
        """`store` was opened: the threads stay until the last opened store closes."""
        self._users.add(id(store))

    async def detach(self, store: object) -> None:
        self._users.discard(id(store))
        if not self._users:
            await self.close()

    async def close(self) -> None:
        """Stop its threads (a store used again starts them again) and leave the cache:
        the next store made for this place builds a new Backend."""
        if self._shared_as is not None and self._shared_as[0] == os.getpid():
            forget_shared(self._shared_as[1])
            self._shared_as = None
        lanes = list(self._lanes.values())
        await asyncio.get_running_loop().run_in_executor(None, _shut_down, lanes)


def _shut_down(lanes: list[BlockingRunner]) -> None:
    for lane in lanes:
        lane.shutdown()


class LocalFileBackend(FileBackend):
    """A local directory: the stores, the maildir queue under `<base_dir>/queue`, and the
    fused operations (omniq.storage.FusedOps), each one call to one of its threads.

    Claims run on the queue's thread (the maildir's listings and lease ages live there).
    Fused submits and finishes run on a few writer threads, the least busy first: their
    time is fsyncs, and fsyncs in flight together share the filesystem's journal commits
    (measured: four files made durable from four threads took 0.65x the time of one
    thread doing them in turn). The maildir's other changes are single renames, links
    and unlinks, safe from any thread as they are from any process."""

    LANES = ("queue", "results", "events")
    WRITERS = 4  # a worker's default concurrency: each running task can finish at once

    def __init__(self, base_dir: str | os.PathLike[str], *, durable: bool = True) -> None:
        local = local_path(base_dir)
        if local is None:
            raise refuse_remote(base_dir)
        super().__init__(local, durable=durable)
        self.root = os.path.join(local, "queue")
        # The shortest dequeue poll any of its queue stores asked for: what a fused claim
        # waits between looks at the queue when other processes feed it.
        self.poll_interval = 0.25
        self._box: Maildir | None = None
        self._writers = [f"write-{i}" for i in range(self.WRITERS)]
        self._lanes.update({w: BlockingRunner(f"omniq-file-{w}") for w in self._writers})
        self._busy = dict.fromkeys(self._writers, 0)

    def queue(self, poll_interval: float = 0.25) -> TaskQueue:
        self.poll_interval = min(self.poll_interval, poll_interval)
        return FileQueue.on(self, poll_interval)

    def box(self) -> Maildir:
        with self._lock:
            if self._box is None:
                self._box = Maildir(self.root, self.durable)
            return self._box

    async def on_box(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(maildir, *args)` on the queue's thread."""
        return await self.run("queue", self._with_box, fn, args)

    def _with_box(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        return fn(self.box(), *args)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        lane = min(self._writers, key=self._busy.__getitem__)
        self._busy[lane] += 1
        try:
            return await self.run(lane, fn, *args)
        finally:
            self._busy[lane] -= 1

    # -- fused operations --

    async def submit(self, task: Task, event: TaskEvent) -> str:
        task_id = await self._write(_submit, self, task, event)
        self.signal.notify("ready")
        self.signal.notify("events")
        return task_id

    async def claim(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int, worker_id: str
    ) -> list[Delivery]:
        names = list(queues)

        def attempt() -> Any:
            return self.run("queue", _claim, self, names, lease, limit, worker_id)

        got = await wait_for_tasks(self.root, self.signal, timeout, self.poll_interval, attempt)
        if got:
            self.signal.notify("events")
        return got

    async def finish(
        self, delivery: Delivery, result: TaskResult, event: TaskEvent, *, failed: bool
    ) -> bool:
        stored = await self._write(_finish, self, delivery, result, event, failed)
        if stored:
            self.signal.notify(result.task_id)
            self.signal.notify("events")
        return stored


# --- the fused operations' file work (on the queue's thread) ---------------------------------


def _submit(backend: LocalFileBackend, task: Task, event: TaskEvent) -> str:
    files = backend.files()
    # The event once the unique key is ours and before the task can be claimed: a held
    # key stores nothing, and ENQUEUED is named (timed) before any STARTED.
    return backend.box().enqueue(
        task, announce=lambda: append_events(files, backend.writer, [event])
    )


def _claim(
    backend: LocalFileBackend, queues: list[str], lease: float, limit: int, worker_id: str
) -> list[Delivery]:
    files, box = backend.files(), backend.box()
    while True:
        got = box.claim(queues, lease, limit)
        kept = [d for d in got if not _settle_stored(files, box, d)]
        if kept or not got:
            break  # (every one it got was settled: there may be more)
    started = [started_event(d, worker_id) for d in kept if runs_now(d)]
    try:
        if started:
            append_events(files, backend.writer, started)
    except BaseException:
        # Not stranded until their leases run out (with an attempt counted): back now.
        for delivery in kept:
            with contextlib.suppress(OSError):
                box.release(delivery.receipt)
        raise
    return kept


def _settle_stored(files: Files, box: Maildir, delivery: Delivery) -> bool:
    """Ack a claimed task whose result is stored (its worker died between the result and
    the ack): dead-lettered when that result is not ok. True when it was settled."""
    if delivery.problem is not None:
        return False
    existing = _stored_result(files, delivery.task_id)
    if existing is None:
        return False
    box.ack(delivery.receipt, delivery.task, not existing.ok)
    return True


def _stored_result(files: Files, task_id: str) -> TaskResult | None:
    """The result that stands: None when none, an expired one, or one that does not
    decode (the next store replaces those)."""
    try:
        result = get_result(files, task_id)
    except CorruptRecord:
        return None
    return None if result is None or result.is_expired() else result


def _finish(
    backend: LocalFileBackend,
    delivery: Delivery,
    result: TaskResult,
    event: TaskEvent,
    failed: bool,
) -> bool:
    files = backend.files()
    # In this order, as on the generic path: the result (the first outcome wins), its
    # event only if it is ours (or ours sent again), then the ack fenced by the lease.
    stored = store_result(files, result) or _stored_result(files, result.task_id) == result
    if stored:
        append_events(files, backend.writer, [event])
    backend.box().ack(delivery.receipt, delivery.task, failed)
    return stored


# --- one Backend per place and process ---------------------------------------------------------


def backend_at(
    base_dir: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    durable: bool = True,
) -> FileBackend:
    """The process's Backend for a place: a local directory (whatever storage options
    are given: they are for fsspec) or an fsspec URL with its options."""
    if local_path(base_dir) is not None:
        return local_backend_at(base_dir, durable)
    options = json.dumps(dict(storage_options or {}), sort_keys=True, default=repr)
    key = ("file", os.fspath(base_dir), options, durable)
    return _shared(key, lambda: FileBackend(base_dir, storage_options, durable=durable))


def local_backend_at(base_dir: str | os.PathLike[str], durable: bool = True) -> LocalFileBackend:
    local = local_path(base_dir)
    if local is None:
        raise refuse_remote(base_dir)
    return _shared(("file", local, durable), lambda: LocalFileBackend(local, durable=durable))


def _shared(key: Hashable, build: Callable[[], B]) -> B:
    def keyed() -> B:
        backend = build()
        backend._shared_as = (os.getpid(), key)
        return backend

    return shared(key, keyed)
