"""`omniq.current_task()`: what a running task may know about itself, and say.

Inside a task (sync, async, or in a `--pool process` child; not a shell task):

    from omniq import current_task

    def resize(paths):
        task = current_task()
        for i, path in enumerate(paths):
            task.raise_if_cancelled()          # `omniq cancel ID` asked us to stop
            ...
            task.progress(i + 1, len(paths), f"resized {path}")

`progress` writes a `progress` event; the worker keeps at most a few per second per
task and always writes the last one before the outcome.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from omniq.errors import OmniQError

ProgressSink = Callable[[float, "float | None", "str | None"], None]


class TaskCancelledError(OmniQError):
    """Raised by `raise_if_cancelled()` once the task was asked to stop."""


@dataclass
class TaskContext:
    """The running task, as its own code sees it."""

    task_id: str
    attempt: int
    queue: str
    func: str
    schedule: str | None = None
    slot: datetime | None = None
    _sink: ProgressSink | None = field(default=None, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def cancelled(self) -> bool:
        """True once `omniq cancel` asked this task to stop (check it between steps)."""
        return self._cancel.is_set()

    def raise_if_cancelled(self) -> None:
        if self._cancel.is_set():
            raise TaskCancelledError(f"task {self.task_id} was cancelled")

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report how far the task got (`done` of `total`, with an optional message)."""
        if isinstance(done, bool) or not isinstance(done, int | float):
            raise TypeError("progress(done): a number")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int | float)):
            raise TypeError("progress(total=): a number or None")
        if self._sink is not None:
            self._sink(done, total, None if message is None else str(message)[:500])


_current: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "omniq_current_task", default=None
)


def current_task() -> TaskContext:
    """The task this code runs in; OmniQError outside a task."""
    ctx = _current.get()
    if ctx is None:
        raise OmniQError("omniq.current_task() is only available inside a running task")
    return ctx


def run_in(ctx: TaskContext, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call `func` with `ctx` as the current task (for threads and child processes)."""
    token = _current.set(ctx)
    try:
        return func(*args, **kwargs)
    finally:
        _current.reset(token)


def set_current(ctx: TaskContext | None) -> contextvars.Token[TaskContext | None]:
    return _current.set(ctx)


def reset(token: contextvars.Token[TaskContext | None]) -> None:
    _current.reset(token)
