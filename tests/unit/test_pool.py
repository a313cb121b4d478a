"""The process pool (omniq.pool.ProcessRunner): isolation, hard timeouts, crashes, reuse."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from omniq.backends.memory import MemoryEventStorage, MemoryQueue, MemoryResultStorage
from omniq.models import Task, TaskStatus
from omniq.pool import ProcessRunner, RemoteError, WorkerProcessDied, remote_error
from omniq.worker import TaskTimedOut, Worker, WorkerSettings, describe_error

HERE = "tests.unit.test_pool"


# --- task functions the children import -----------------------------------------------------


class Bounced(Exception):
    pass


def bounce(message: str) -> None:
    raise Bounced(message)


def pid() -> int:
    return os.getpid()


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def sleep_with_pid(pid_file: str, seconds: float) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)


def spawn_and_wait(pid_file: str) -> None:
    """A task with a subprocess of its own: a timeout must end that one too."""
    child = subprocess.Popen(["sleep", "60"])
    Path(pid_file).write_text(str(child.pid))
    child.wait()


def not_json() -> object:
    return object()


# --- helpers ------------------------------------------------------------------------------


def run(body: Callable[[ProcessRunner], Awaitable[None]], size: int = 2) -> None:
    async def main() -> None:
        runner = ProcessRunner(size)
        try:
            await asyncio.wait_for(body(runner), 60)
        finally:
            runner.close()

    asyncio.run(main())


def task(func: str, *args: Any, timeout: float | None = None) -> Task:
    return Task(func=func, args=args, timeout=timeout)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Still listed: a zombie (killed, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def wait_gone(pid: int) -> bool:
    for _ in range(200):
        if gone(pid):
            return True
        await asyncio.sleep(0.05)
    return False


async def read_pid(path: Path) -> int:
    for _ in range(400):
        if path.exists() and path.read_text():
            return int(path.read_text())
        await asyncio.sleep(0.025)
    raise AssertionError(f"{path} was not written")


# --- values and errors -----------------------------------------------------------------------


def test_sync_and_async_tasks_return_their_values() -> None:
    async def body(runner: ProcessRunner) -> None:
        assert await runner.run(task("omniq.examples:add", 2, 3)) == 5
        assert await runner.run(task("omniq.examples:async_sleep", 0.01, "x")) == "x"

    run(body)


def test_tasks_run_in_another_process_that_is_reused() -> None:
    async def body(runner: ProcessRunner) -> None:
        first = await runner.run(task(f"{HERE}:pid"))
        second = await runner.run(task(f"{HERE}:pid"))
        assert first != os.getpid()
        assert first == second
        assert runner.processes == 1

    run(body)


def test_remote_exception_keeps_its_type_message_and_traceback() -> None:
    async def body(runner: ProcessRunner) -> None:
        with pytest.raises(RemoteError) as builtin:
            await runner.run(task("omniq.examples:fail", "boom"))
        name, message, tb = describe_error(builtin.value)
        assert (name, message) == ("RuntimeError", "boom")
        assert "examples.py" in tb and "in fail" in tb
        with pytest.raises(RemoteError) as custom:
            await runner.run(task(f"{HERE}:bounce", "bad address"))
        assert describe_error(custom.value)[:2] == (f"{HERE}.Bounced", "bad address")

    run(body)


def test_import_errors_and_non_json_values_are_task_errors() -> None:
    async def body(runner: ProcessRunner) -> None:
        with pytest.raises(RemoteError) as missing:
            await runner.run(task("omniq.no_such_module:f"))
        assert describe_error(missing.value)[0] == "ModuleNotFoundError"
        with pytest.raises(RemoteError) as bad:
            await runner.run(task(f"{HERE}:not_json"))
        name, message, _ = describe_error(bad.value)
        assert name == "omniq.errors.SerializationError"
        assert "return value" in message

    run(body)


def test_remote_error_names() -> None:
    assert describe_error(remote_error("ValueError", "m", None))[:2] == ("ValueError", "m")
    assert describe_error(remote_error("a.b.Oops", "", "tb"))[0] == "a.b.Oops"
    assert type(remote_error("a.b.Oops", "", None)) is type(remote_error("a.b.Oops", "x", None))


# --- timeouts, crashes, cancellation --------------------------------------------------------


def test_timeout_kills_the_child_and_its_subprocesses(tmp_path: Path) -> None:
    async def body(runner: ProcessRunner) -> None:
        pid_file = tmp_path / "pid"
        with pytest.raises(TaskTimedOut):
            await runner.run(task(f"{HERE}:spawn_and_wait", str(pid_file), timeout=1.0))
        assert await wait_gone(await read_pid(pid_file))
        assert await runner.run(task("omniq.examples:add", 1, 1)) == 2

    run(body)


def test_crash_fails_that_task_only() -> None:
    async def body(runner: ProcessRunner) -> None:
        with pytest.raises(WorkerProcessDied, match="worker process exited with code 13"):
            await runner.run(task("omniq.examples:crash", 13))
        with pytest.raises(WorkerProcessDied, match=r"code -11 \(SIGSEGV\)"):
            await runner.run(task(f"{HERE}:segfault"))
        assert await runner.run(task("omniq.examples:add", 1, 2)) == 3

    run(body)


def test_a_crash_does_not_disturb_tasks_running_beside_it() -> None:
    async def body(runner: ProcessRunner) -> None:
        outcomes = await asyncio.gather(
            runner.run(task("omniq.examples:sleep", 0.5, "slow")),
            runner.run(task("omniq.examples:crash", 3)),
            runner.run(task("omniq.examples:sleep", 0.2, "quick")),
            return_exceptions=True,
        )
        assert outcomes[0] == "slow" and outcomes[2] == "quick"
        assert isinstance(outcomes[1], WorkerProcessDied)
        assert runner.processes <= 2  # idle children beyond the size are stopped

    run(body, size=2)


def test_cancelling_a_task_kills_its_child(tmp_path: Path) -> None:
    async def body(runner: ProcessRunner) -> None:
        pid_file = tmp_path / "pid"
        running = asyncio.create_task(runner.run(task(f"{HERE}:sleep_with_pid", str(pid_file), 30)))
        child = await read_pid(pid_file)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert await wait_gone(child)
        assert runner.processes == 0

    run(body)


def test_close_stops_idle_children() -> None:
    async def main() -> None:
        runner = ProcessRunner(2)
        child = await runner.run(task(f"{HERE}:pid"))
        runner.close()
        assert await wait_gone(child)
        with pytest.raises(RuntimeError):
            await runner.run(task(f"{HERE}:pid"))

    asyncio.run(main())


def test_children_end_when_the_worker_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = textwrap.dedent(
        f"""
        import asyncio
        from omniq.models import Task
        from omniq.pool import ProcessRunner

        async def main():
            runner = ProcessRunner(1)
            await runner.run(Task(func="{HERE}:sleep_with_pid", args=({str(pid_file)!r}, 60)))

        if __name__ == "__main__":
            asyncio.run(main())
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    try:
        child = asyncio.run(read_pid(pid_file))
    finally:
        parent.kill()
        parent.wait()
    assert asyncio.run(wait_gone(child))


# --- with the engine ------------------------------------------------------------------------


def test_worker_with_process_pool_records_timeout_crash_and_errors() -> None:
    async def main() -> None:
        queue, results, events = MemoryQueue(), MemoryResultStorage(), MemoryEventStorage()
        settings = WorkerSettings(
            pool="process", concurrency=2, burst=True, poll_interval=0.02, register=False
        )
        tasks = [
            task("omniq.examples:sleep", 30, timeout=0.5),
            task("omniq.examples:crash", 13),
            task("omniq.examples:fail", "boom"),
            task("omniq.examples:add", 40, 2),
        ]
        for t in tasks:
            await queue.enqueue(t)
        runner = ProcessRunner(settings.concurrency)
        try:
            await Worker(queue, results, events, settings, runner=runner).run()
        finally:
            runner.close()
        timeout, crash, fail, add = [await results.get(t.id) for t in tasks]
        assert timeout and timeout.status == TaskStatus.TIMEOUT
        assert crash and crash.status == TaskStatus.FAILED
        assert crash.error_type == "omniq.pool.WorkerProcessDied"
        assert crash.error_message == "worker process exited with code 13"
        assert fail and fail.status == TaskStatus.FAILED
        assert (fail.error_type, fail.error_message) == ("RuntimeError", "boom")
        assert fail.traceback and "in fail" in fail.traceback
        assert add and add.value == 42

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_run_cancelled_while_its_child_starts_leaves_no_child_behind() -> None:
    """A forced stop can cancel a run while its child process is being started: that
    child must not outlive close() (the interpreter would wait for it at exit)."""

    async def main() -> list[int]:
        runner = ProcessRunner(1)
        run = asyncio.ensure_future(runner.run(Task(func=f"{HERE}:pid")))
        for _ in range(100):  # until its child is being started
            await asyncio.sleep(0)
            if len(runner._spawned):
                break
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await asyncio.sleep(1.0)  # the start finishes meanwhile
        started = [c.process.pid for c in runner._spawned if c.process.pid]
        runner.close()
        return started

    for pid_ in asyncio.run(main()):
        deadline = time.monotonic() + 5
        while _alive(pid_):
            assert time.monotonic() < deadline, f"child {pid_} outlived close()"
            time.sleep(0.05)


def _alive(process_id: int) -> bool:
    try:
        os.kill(process_id, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{process_id}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
