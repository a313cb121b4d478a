"""Runs tasks in child processes: a hard timeout kills the child, a crash fails one task only.

concurrent.futures.ProcessPoolExecutor is not used on purpose: when one of its children
dies, the whole executor is broken and every pending future fails. Here each child is
managed on its own: a dead or killed child is replaced, the other tasks never notice.
Children are reused between tasks (imports are paid once) and started with "forkserver"
(or "spawn"), never "fork", so they do not inherit the worker's threads and event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import logging
import multiprocessing
import os
import signal
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from omniq.models import Task

log = logging.getLogger("omniq.pool")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# --- errors seen by the engine ------------------------------------------------------------


class RemoteError(Exception):
    """A task's exception from a child process, re-raised under the original type name.

    Subclasses are made on the fly with the original module and name, so the engine's
    describe_error() records e.g. "ValueError" or "myapp.errors.Bounced", not RemoteError.
    """

    def __init__(self, message: str, remote_traceback: str | None = None) -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback


class RemoteTraceback(Exception):
    """Carries the child's traceback text as the cause, so formatted tracebacks show it."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


class WorkerProcessDied(Exception):
    """The child running the task ended without answering (crash, os._exit, OOM kill)."""

    def __init__(self, exit_code: int | None) -> None:
        self.exit_code = exit_code
        super().__init__(f"worker process exited with code {exit_code}{_signal_name(exit_code)}")


def _signal_name(code: int | None) -> str:
    if code is None or code >= 0:
        return ""
    try:
        return f" ({signal.Signals(-code).name})"
    except ValueError:
        return ""


_REMOTE_TYPES: dict[str, type[RemoteError]] = {}


def remote_error(type_name: str, message: str, traceback_text: str | None) -> RemoteError:
    """A RemoteError whose class is named like the child's exception."""
    cls = _REMOTE_TYPES.get(type_name)
    if cls is None:
        module, _, name = type_name.rpartition(".")
        attrs = {"__module__": module or "builtins", "__qualname__": name}
        cls = type(name, (RemoteError,), attrs)
        if len(_REMOTE_TYPES) < 1000:  # bounded: type names come from task code
            _REMOTE_TYPES[type_name] = cls
    error = cls(message, traceback_text)
    if traceback_text:
        error.__cause__ = RemoteTraceback(traceback_text)
    return error


# --- the child side ------------------------------------------------------------------------

# func path, args, kwargs, the task's context fields (omniq.context.TaskContext)
Job = tuple[str, tuple[Any, ...], dict[str, Any], dict[str, Any]]
# ("ok", value) or ("error", (type name, message, traceback)); before either, any number
# of ("progress", (done, total, message)) from omniq.current_task().progress()
Reply = tuple[str, Any]


def _child_main(conn: Connection, lifeline: Connection) -> None:
    """Entry point of a child: run jobs from the pipe until told to stop or orphaned."""
    _become_task_process(lifeline)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        func_path, args, kwargs, fields = job
        reply = _run_with_context(conn, fields, func_path, args, kwargs)
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return


def _run_with_context(
    conn: Connection,
    fields: dict[str, Any],
    func_path: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Reply:
    from omniq.context import TaskContext, run_in

    def sink(done: float, total: float | None, message: str | None) -> None:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("progress", (done, total, message)))

    ctx = TaskContext(**fields, _sink=sink)
    reply: Reply = run_in(ctx, _run_job, func_path, args, kwargs)
    return reply


def _become_task_process(lifeline: Connection) -> None:
    # Own process group: a timeout kill reaches the task's own subprocesses too, and a
    # Ctrl-C at the terminal goes to the worker, which decides what happens to tasks.
    # The stop signals belong to the worker: `kill -TERM -PGID` (systemd's
    # KillMode=control-group, a shell's job control) reaches children too, and the
    # worker's graceful drain decides what happens to their tasks (a hard stop kills
    # them with SIGKILL and hands the tasks back).
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    watcher = threading.Thread(
        target=_exit_when_orphaned, args=(lifeline,), name="omniq-lifeline", daemon=True
    )
    watcher.start()


def _exit_when_orphaned(lifeline: Connection) -> None:
    # The worker holds the other end and never writes: readable means it is gone. A worker
    # killed with SIGKILL cannot stop its children; its leases run out and another worker
    # runs those tasks, so an orphan must not carry on. (The parent process id does not
    # tell: under forkserver the parent is the fork server, which outlives the worker.)
    with contextlib.suppress(Exception):
        lifeline.poll(None)
    os._exit(70)


def _run_job(func_path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Reply:
    from omniq import serialization
    from omniq.worker import describe_error

    try:
        func = serialization.resolve(func_path)
        value = func(*args, **kwargs)
        if inspect.isawaitable(value):
            value = asyncio.run(_awaited(value))
        serialization.check_json(value, "the return value")
    except BaseException as exc:  # SystemExit too: it is the task's outcome, not ours
        tb = exc.__traceback__
        # The traceback starts in the task's code, not in this function.
        return "error", describe_error(exc.with_traceback(tb.tb_next if tb else None))
    return "ok", value


async def _awaited(value: Any) -> Any:
    return await value


# --- the parent side -----------------------------------------------------------------------


@dataclass(eq=False)
class _Child:
    process: BaseProcess
    conn: Connection
    lifeline: Connection  # closing it makes the child exit

    def alive(self) -> bool:
        return self.process.is_alive() and not self.conn.closed

    def close(self) -> None:
        self.conn.close()
        self.lifeline.close()


def _start_forkserver_deaf_to_stops() -> None:
    """Start the fork server now, ignoring SIGTERM/SIGINT (inherited through its exec).

    It lives in the worker's process group: killed by a group-wide SIGTERM it would take
    every child's exit status with it, and a running task would be recorded as failed.
    Signal dispositions can only be changed from the main thread; elsewhere the server
    starts on first use as before.
    """
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        forkserver.ensure_running()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


Progress = Callable[[float, "float | None", "str | None"], None]


class ProcessRunner:
    """`await runner.run(task)` runs one task in a child process of a managed pool.

    Raises omniq.worker.TaskTimedOut after the task's timeout (the child is killed),
    WorkerProcessDied when the child ends without answering, and a RemoteError named
    like the task's own exception otherwise.
    """

    def __init__(self, size: int = 4, *, start_method: str | None = None) -> None:
        self.size = max(1, size)
        self._ctx = multiprocessing.get_context(start_method or default_start_method())
        if self._ctx.get_start_method() == "forkserver":
            self._ctx.set_forkserver_preload(["omniq.pool", "omniq.worker"])
            _start_forkserver_deaf_to_stops()
        self._idle: list[_Child] = []
        self._busy: set[_Child] = set()
        self._spawned: weakref.WeakSet[_Child] = weakref.WeakSet()  # every child, for close()
        self._closed = False
        _LIVE.add(self)

    async def run(
        self,
        task: Task,
        context: dict[str, Any] | None = None,
        progress: Callable[[float, float | None, str | None], None] | None = None,
    ) -> Any:
        """Run `task` in a child; `context` gives the child's omniq.current_task() its
        fields, `progress` receives what the task reports."""
        if self._closed:
            raise RuntimeError("the process pool is closed")
        fields = context or {"task_id": task.id, "attempt": 1, "queue": task.queue,
                             "func": task.func}
        child = await self._send((task.func, tuple(task.args), dict(task.kwargs), fields))
        reusable = False
        try:
            reply = await self._wait_reply(child, task.timeout, progress)
            reusable = True
        finally:
            # Timed out, cancelled (shutdown) or crashed: the child cannot be trusted again.
            self._busy.discard(child)
            if reusable:
                self._give_back(child)
            else:
                _kill(child)
        return _unpack(reply)

    async def _send(self, job: Job) -> _Child:
        """Hand the job to an idle child (a fresh one if needed); the child is then busy."""
        for _ in range(3):
            child = await self._acquire()
            try:
                child.conn.send(job)
            except (OSError, ValueError):  # died while idle: replace it silently
                _kill(child)
                continue
            self._busy.add(child)
            return child
        raise RuntimeError("cannot start a worker process for the task")

    async def _acquire(self) -> _Child:
        while self._idle:
            child = self._idle.pop()
            if child.alive():
                return child
            _kill(child)
        return await self._spawn()

    async def _spawn(self) -> _Child:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        life_read, life_write = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_child_main, args=(child_end, life_read), name="omniq-task"
        )
        child = _Child(process, parent_end, life_write)
        self._spawned.add(child)
        # Starting a child (and the fork server, the first time) blocks: not on the loop.
        # A caller cancelled meanwhile (a forced stop) must not leave the child behind:
        # the interpreter would wait for it at exit.
        start = asyncio.ensure_future(asyncio.to_thread(process.start))
        try:
            await asyncio.shield(start)
        except asyncio.CancelledError:
            start.add_done_callback(lambda _: _kill(child))
            raise
        finally:
            child_end.close()
            life_read.close()
        return child

    async def _wait_reply(
        self, child: _Child, timeout: float | None, progress: Progress | None
    ) -> Reply:
        from omniq.worker import TaskTimedOut

        try:
            return await asyncio.wait_for(self._reply(child, progress), timeout)
        except TimeoutError:
            raise TaskTimedOut() from None

    async def _reply(self, child: _Child, progress: Progress | None) -> Reply:
        while True:
            await _readable(child.conn.fileno(), child.process.sentinel)
            if not child.conn.poll():
                break
            try:
                reply: Reply = child.conn.recv()
            except (EOFError, OSError):
                break
            if reply[0] != "progress":
                return reply
            if progress is not None:
                progress(*reply[1])
        raise WorkerProcessDied(await _exit_code(child))

    def _give_back(self, child: _Child) -> None:
        if self._closed or len(self._idle) >= self.size:
            _stop(child)
        else:
            self._idle.append(child)

    def close(self) -> None:
        """Stop idle children, kill busy ones (their tasks were released by the engine)."""
        if self._closed:
            return
        self._closed = True
        idle, self._idle = self._idle, []
        for child in idle:
            _stop(child)
        for child in list(self._busy):
            _kill(child)
        self._busy.clear()
        for child in list(self._spawned):  # one whose caller was cancelled while it started
            if child not in idle and child.process.exitcode is None:
                _kill(child)
        for child in idle:
            child.process.join(1.0)
            if child.process.exitcode is None:
                _kill(child)
        _LIVE.discard(self)

    @property
    def processes(self) -> int:
        return len(self._idle) + len(self._busy)


def _unpack(reply: Reply) -> Any:
    kind, payload = reply
    if kind == "ok":
        return payload
    type_name, message, traceback_text = payload
    raise remote_error(type_name, message, traceback_text)


async def _readable(*fds: int) -> None:
    """Wait until any of `fds` is readable (data, EOF, or a process sentinel firing)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    for fd in fds:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        for fd in fds:
            loop.remove_reader(fd)


async def _exit_code(child: _Child) -> int | None:
    """The exit code of a child that stopped answering (negative: killed by that signal)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_readable(child.process.sentinel), 5.0)
    child.process.join(0.1)
    return child.process.exitcode


def _stop(child: _Child) -> None:
    with contextlib.suppress(OSError, ValueError):
        child.conn.send(None)
    child.close()


def _kill(child: _Child) -> None:
    process = child.process
    if process.exitcode is None and process.pid is not None:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError):
            process.kill()
    child.close()
    # Reap now if it is already gone; the rest is reaped by multiprocessing later.
    with contextlib.suppress(OSError, ValueError, AssertionError):
        process.join(0)


_LIVE: weakref.WeakSet[ProcessRunner] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Children are not daemonic (so tasks may use multiprocessing themselves); without
    # this, multiprocessing's own exit hook would wait forever for them.
    for runner in list(_LIVE):
        runner.close()
