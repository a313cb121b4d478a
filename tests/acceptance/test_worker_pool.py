"""`omniq worker --pool process`: hard timeouts, crash isolation, remote errors, shutdown."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.test_worker_daemon import Home, wait_until

CRASHY = """
import os, signal, time

def segfault():
    os.kill(os.getpid(), signal.SIGSEGV)

def sleep_with_pid(path, seconds):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return "woke"
"""


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    h = Home(tmp_path)
    (tmp_path / "crashy.py").write_text(CRASHY)  # importable: the worker runs in tmp_path
    yield h
    h.close()


def test_timeout_kills_the_task_and_the_worker_carries_on(home: Home) -> None:
    slow = home.submit("omniq.examples:sleep", 30, timeout=1)
    after = home.submit("omniq.examples:add", 1, 2)
    proc = home.burst("--pool", "process", "-c", "1")
    result = home.result(slow)
    assert result["status"] == "timeout"
    assert "timeout of 1" in result["error_message"]
    assert home.result(after)["value"] == 3
    assert f"task {after} add@default completed" in proc.stderr


def test_a_crashing_task_fails_alone(home: Home) -> None:
    exits = home.submit("omniq.examples:crash", 13)
    segv = home.submit("crashy:segfault")
    after = home.submit("omniq.examples:add", 2, 2)
    home.burst("--pool", "process", "-c", "1", "--task-modules", "crashy")
    result = home.result(exits)
    assert result["status"] == "failed"
    assert result["error_message"] == "worker process exited with code 13"
    assert "worker process exited with code -11" in home.result(segv)["error_message"]
    assert home.result(after)["value"] == 4


def test_remote_errors_keep_their_type_and_traceback(home: Home) -> None:
    task_id = home.submit("omniq.examples:fail", "boom")
    home.burst("--pool", "process")
    result = home.result(task_id)
    assert (result["status"], result["error_type"], result["error_message"]) == (
        "failed",
        "RuntimeError",
        "boom",
    )
    assert "examples.py" in result["traceback"]
    cli = home.run("result", task_id)  # what the user sees
    assert cli.returncode == 1 and "RuntimeError: boom" in cli.stderr


def test_sigterm_past_the_shutdown_timeout_kills_the_child_and_releases(home: Home) -> None:
    pid_file = home.path / "task.pid"
    task_id = home.submit("crashy:sleep_with_pid", str(pid_file), 60)
    worker = home.start_worker(
        "--pool", "process", "--shutdown-timeout", "1", "--task-modules", "crashy"
    )
    child = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), what="task pid"))
    worker.send(signal.SIGTERM)
    assert worker.wait() == 0
    assert f"task {task_id} sleep_with_pid@default released" in worker.log
    wait_until(lambda: not _alive(child), 10, "the task process to end")
    assert home.result(task_id)["status"] == "pending"


def test_sigterm_to_the_whole_process_group_drains_instead_of_failing_the_task(
    home: Home,
) -> None:
    """`kill -TERM -PGID` (KillMode=control-group, a shell's job control) reaches the task
    processes too: they must leave the decision to the worker's graceful drain."""
    task_id = home.submit("omniq.examples:sleep", 2, "done")
    worker = home.start_worker("--pool", "process", "-c", "1", own_group=True)
    home.wait_started(task_id)
    wait_until(lambda: len(_children(worker.proc.pid)) >= 2, 10, "the task process")
    os.killpg(worker.proc.pid, signal.SIGTERM)
    assert worker.wait() == 0, worker.log
    result = home.result(task_id)
    assert (result["status"], result["value"]) == ("completed", "done"), result


def test_a_forced_stop_of_the_process_group_releases_the_task(home: Home) -> None:
    task_id = home.submit("omniq.examples:sleep", 60, "done")
    worker = home.start_worker("--pool", "process", "-c", "1", own_group=True)
    home.wait_started(task_id)
    wait_until(lambda: len(_children(worker.proc.pid)) >= 2, 10, "the task process")
    os.killpg(worker.proc.pid, signal.SIGTERM)
    worker.wait_log("send again to force")
    os.killpg(worker.proc.pid, signal.SIGTERM)
    assert worker.wait(30) == 128 + signal.SIGTERM, worker.log
    assert home.result(task_id)["status"] == "pending"  # handed back: never a failure
    kinds = [e.event_type.value for e in home.api.get_events(task_id)]
    assert "failed" not in kinds and kinds[-1] == "released"


def _children(pid: int) -> list[int]:
    """Processes of the worker's process group other than the worker itself."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid:
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pid:  # the process group id
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is gone too
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
