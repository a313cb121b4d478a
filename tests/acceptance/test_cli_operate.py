"""Issue 11 with the real `omniq` on every durable technology: failed tasks in bulk,
schedules fired by several workers (one killed mid-fire), cancelling running tasks,
progress, dependencies and a shell task's live output.

Each test deploys its own namespace (tests/acceptance/test_server_backends.py `deploy`),
so they run side by side (`-n 4`); each waits for what it needs, never a fixed time
longer than the behaviour under test.
"""

from __future__ import annotations

import itertools
import json
import os
import pty
import re
import signal
import subprocess
import threading
import time
from datetime import timedelta
from typing import Any

import pytest

from tests.acceptance import test_server_backends as backends
from tests.acceptance.conftest import CLI
from tests.acceptance.test_resilience import DURABLE
from tests.acceptance.test_server_backends import Deploy, ServerHome
from tests.acceptance.test_worker_daemon import wait_until

deploy = backends.deploy  # the fixture

TASKS = '''
import time
from omniq import current_task

def steps(n, pause):
    task = current_task()
    for i in range(n):
        time.sleep(pause)
        task.progress(i + 1, n, f"step {i + 1}")
    return n

def cooperative(seconds):
    task = current_task()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        task.raise_if_cancelled()
        time.sleep(0.05)
    return "not cancelled"
'''
MODULES = ("--task-modules", "opstasks")


def ops_home(deploy: Deploy, tech: str, **env: str) -> ServerHome:
    home = deploy(tech, **env)
    (home.path / "opstasks.py").write_text(TASKS)  # workers run in home.path
    return home


def ok(home: ServerHome, *args: str) -> str:
    """`omniq ARGS` that must exit 0; its stdout."""
    proc = home.run(*args)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


# --- failed tasks ---------------------------------------------------------------------------


@pytest.mark.parametrize("tech", DURABLE)
def test_failed_list_retry_all_and_purge(tech: str, deploy: Deploy) -> None:
    home = deploy(tech)
    defaults = [home.submit("omniq.examples:fail", f"boom {i}") for i in range(2)]
    mail = home.submit("omniq.examples:fail", "mail boom", queue="mail")
    home.submit("omniq.examples:add", 1, 1)
    home.burst("-q", "default", "-q", "mail")

    listed = json_lines(ok(home, "failed", "--json"))
    assert {r["task_id"] for r in listed} == {*defaults, mail}
    assert [r["failed_at"] for r in listed] == sorted((r["failed_at"] for r in listed),
                                                      reverse=True)
    first = next(r for r in listed if r["task_id"] == mail)
    assert (first["queue"], first["func"], first["attempts"], first["error_type"],
            first["error_message"]) == ("mail", "omniq.examples:fail", 1, "RuntimeError",
                                        "mail boom")
    (line,) = ok(home, "failed", "-q", "mail", "--since", "1h").splitlines()
    assert line.split("\t")[1:] == [mail, "mail", "omniq.examples:fail", "1",
                                    "RuntimeError: mail boom"]
    assert ok(home, "failed", "--func", "add") == ""
    assert len(ok(home, "failed", "--func", "omniq.examples:fa*", "-n", "2").splitlines()) == 2

    dry = ok(home, "retry", "--all-failed", "-q", "default", "--dry-run")
    assert dry == "would queue 2 failed tasks of queue 'default' again (dry run)\n"
    assert len(json_lines(ok(home, "failed", "--json"))) == 3  # a dry run changes nothing
    done = json.loads(ok(home, "retry", "--all-failed", "-q", "default", "--json"))
    assert (done["count"], set(done["task_ids"]), done["dry_run"]) == (2, set(defaults), False)
    again = json.loads(ok(home, "retry", "--all-failed", "-q", "default", "--json"))
    assert again["count"] == 0  # queued already: nothing is queued twice
    assert {r["task_id"] for r in json_lines(ok(home, "failed", "--json"))} == {mail}
    home.burst()
    assert all(home.events(t).count("enqueued") == 2 for t in defaults)

    refused = home.run("purge", "--failed", "-q", "mail")  # no terminal, no --yes
    assert refused.returncode == 2 and "add --yes" in refused.stderr
    assert ok(home, "purge", "--failed", "-q", "mail", "--dry-run") == (
        "would delete 1 failed task of queue 'mail' (dry run)\n")
    assert ok(home, "purge", "--failed", "-q", "mail", "--yes") == (
        "purged 1 failed task of queue 'mail'\n")
    assert {r["task_id"] for r in json_lines(ok(home, "failed", "--json"))} == set(defaults)
    queues = {q["queue"]: q for q in json.loads(ok(home, "status", "--json"))["queues"]}
    assert queues["default"]["failed"] == 2 and queues.get("mail", {}).get("failed", 0) == 0


# --- schedules ------------------------------------------------------------------------------


def fired_ids(*workers: Any) -> list[str]:
    """Task ids the workers logged as enqueued by a schedule (each worker logs its own)."""
    return [m for w in workers for m in re.findall(r"schedule fired: task (\S+)", w.log)]


def slot_of(home: ServerHome, task_id: str) -> str:
    (enqueued,) = [e for e in home.api.get_events(task_id) if e.event_type.value == "enqueued"]
    assert enqueued.details["schedule"] == "tick"
    return str(enqueued.details["slot"])


@pytest.mark.parametrize("tech", DURABLE)
def test_three_workers_enqueue_each_slot_once_and_pause_resume(
    tech: str, deploy: Deploy
) -> None:
    home = deploy(tech)
    ok(home, "schedule", "add", "tick", "omniq.examples:echo", "hi", "--every", "1s",
       "-q", "ticks", "--catch-up", "all")
    workers = [home.start_worker("-q", "ticks", ready=False) for _ in range(3)]
    for worker in workers:
        worker.wait_log(" started: ")
    wait_until(lambda: len(fired_ids(*workers)) >= 3, 30, "three slots fired")

    ok(home, "schedule", "pause", "tick")
    time.sleep(1.2)  # a fire that began before the pause may still finish
    before = fired_ids(*workers)
    time.sleep(1.5)
    assert fired_ids(*workers) == before  # paused: nothing more
    (shown,) = json_lines(ok(home, "schedule", "list", "--json"))
    assert (shown["paused"], shown["next_slot"]) == (True, None)
    early = sorted(slot_of(home, t) for t in before)
    assert shown["last_slot"] is not None and _time(shown["last_slot"]) == _time(early[-1])
    # Until the pause, every slot of the 1 s grid was enqueued, once.
    times = [_time(s) for s in early]
    assert [b - a for a, b in itertools.pairwise(times)] == \
        [timedelta(seconds=1)] * (len(times) - 1)
    ok(home, "schedule", "resume", "tick")
    wait_until(lambda: len(fired_ids(*workers)) > len(before), 30, "a slot after the resume")
    for worker in workers:
        worker.send(signal.SIGTERM)
        assert worker.wait() == 0

    ids = fired_ids(*workers)
    assert len(set(ids)) == len(ids)
    slots = [slot_of(home, t) for t in ids]
    assert len(set(slots)) == len(slots), "a slot was enqueued twice"
    event = json_lines(ok(home, "events", ids[0], "--json"))[0]
    assert event["details"]["schedule"] == "tick" and event["details"]["slot"] == slots[0]


def _time(text: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# How many missed slots the killed worker has to enqueue: enough that it is still at it
# when the test sees the first one.
MISSED = {"redis": 500, "postgres": 800, "nats": 800, "sqlite": 800, "file": 400}


@pytest.mark.parametrize("tech", DURABLE)
def test_a_worker_killed_while_it_fires_leaves_each_slot_enqueued_once(
    tech: str, deploy: Deploy
) -> None:
    from datetime import UTC, datetime

    from omniq.schedules import Schedule

    home = deploy(tech)
    missed = MISSED[tech]
    start = datetime.now(UTC) - timedelta(seconds=missed + 0.5)
    home.api.add_schedule(Schedule(name="tick", func="omniq.examples:add", args=(1, 1),
                                   every=1, queue="ticks", created_at=start, catch_up="all",
                                   catch_up_limit=10 * missed))
    first = home.start_worker("-q", "elsewhere")

    def queued() -> int:
        return sum(s.queued for s in home.api.stats() if s.queue == "ticks")

    wait_until(lambda: queued() > 0, 30, "the first slot enqueued")
    first.proc.kill()
    assert first.proc.wait(30) == -signal.SIGKILL
    at_kill = queued()
    assert 0 < at_kill < missed, f"not killed mid-fire: {at_kill} of {missed} enqueued"

    second = home.start_worker("-q", "elsewhere")
    wait_until(lambda: queued() >= missed, 60, "the other slots enqueued")
    home.api.pause_schedule("tick")
    time.sleep(2.5)  # the second worker's fire in progress ends; no new one starts
    (tick,) = home.api.schedules()
    expected = round((tick.last_slot - start).total_seconds())  # slots in (start, last]
    second.send(signal.SIGTERM)
    assert second.wait() == 0
    # Each slot's task runs once. A task the killed worker left half-enqueued never runs
    # (on NATS its state without a message: an idle worker drops it, its key is taken).
    runner = home.start_worker("-q", "ticks")

    def left() -> int:  # a task claimed but not started when SIGTERM comes is handed back
        return sum(s.queued + s.running + s.scheduled for s in home.api.stats()
                   if s.queue == "ticks")

    wait_until(lambda: left() == 0, 90, "every slot's task run, nothing left behind")
    runner.send(signal.SIGTERM)
    assert runner.wait() == 0
    done = re.findall(r"stopped: (\d+) tasks? done", runner.log)
    assert done == [str(expected)], ("a slot enqueued twice, or one lost",
                                     home.api.stats(), runner.log[-2000:])


# --- cancel ---------------------------------------------------------------------------------


def timed(home: ServerHome, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    proc = home.run(*args)
    return proc, time.monotonic() - began


@pytest.mark.parametrize("tech", DURABLE)
def test_cancel_running_tasks_async_sync_and_process(tech: str, deploy: Deploy) -> None:
    home = ops_home(deploy, tech)
    threads = home.start_worker("-c", "4", *MODULES, ready=False)
    procs = home.start_worker("--pool", "process", "-q", "proc", "-c", "2",
                              "--cancel-grace", "2s", *MODULES, ready=False)
    run_async = home.enqueue("omniq.examples:async_sleep", "60", "--retries", "2")
    run_sync = home.enqueue("opstasks:cooperative", "60")
    stubborn = home.enqueue("omniq.examples:sleep", "4", "slept")
    graceful = home.enqueue("-q", "proc", "omniq.examples:sleep", "60")
    killed = home.enqueue("-q", "proc", "omniq.examples:sleep", "60")
    for task_id in (run_async, run_sync, stubborn, graceful, killed):
        home.poll(lambda t=task_id: "started" in home.events(t), 30, f"{task_id} started")

    requested = home.run("cancel", stubborn, "--wait", "1s")  # a sync task that never checks
    assert requested.returncode == 3 and "no worker confirmed" in requested.stderr
    assert ok(home, "cancel", run_async) == f"cancelled {run_async} while it was running\n"
    record = json.loads(ok(home, "cancel", run_sync, "--json"))
    assert (record["outcome"], record["cancelled"], record["status"]) == (
        "cancelled_while_running", True, "cancelled")

    proc, graced = timed(home, "cancel", graceful)
    assert proc.returncode == 0 and "while it was running" in proc.stdout and graced >= 2
    proc, _ = timed(home, "cancel", killed, "--kill")
    assert proc.returncode == 0 and "while it was running" in proc.stdout
    procs.wait_log(f"task {graceful} sleep@proc cancel requested; killed in 2s")
    procs.wait_log(f"task {killed} sleep@proc cancel requested\n")

    for task_id in (run_async, run_sync, graceful, killed):
        assert home.events(task_id) == ["enqueued", "started", "cancelled"]  # not retried
        assert home.result(task_id)["status"] == "cancelled"
    again = home.run("cancel", run_async)
    assert again.returncode == 5 and "had already finished (cancelled)" in again.stderr
    assert home.outcome(stubborn).value == "slept"  # not interrupted: it never looked
    waiting = home.enqueue("-q", "nobody", "omniq.examples:add", "1", "1")
    assert ok(home, "cancel", waiting) == f"cancelled {waiting} before it ran\n"
    assert home.run("cancel", "0190a5c4-7b1e-7c3d-8a2b-1f2e3d4c5b6a").returncode == 4
    assert f"task {run_sync} cooperative@default cancelled" in threads.log


# --- progress -------------------------------------------------------------------------------


def run_on_terminal(home: ServerHome, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """`omniq ARGS` with stderr on a terminal (stdout piped): (code, stdout, terminal)."""
    controller, terminal = pty.openpty()
    env = {**home.env, "TERM": "xterm-256color", "COLUMNS": "120"}
    proc = subprocess.Popen([*CLI, *args], cwd=home.path, env=env, stdout=subprocess.PIPE,
                            stderr=terminal, stdin=subprocess.DEVNULL, text=True)
    os.close(terminal)
    seen: list[bytes] = []

    def drain() -> None:  # a full terminal buffer would block the command
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        reader.join(10)
        os.close(controller)
    return proc.returncode, out, b"".join(seen).decode(errors="replace")


@pytest.mark.parametrize("tech", DURABLE)
def test_progress_in_events_tail_and_a_bar_while_waiting(tech: str, deploy: Deploy) -> None:
    home = ops_home(deploy, tech)
    home.start_worker(*MODULES)
    code, out, screen = run_on_terminal(
        home, "enqueue", "opstasks:steps", "5", "0.4", "--wait")
    assert (code, out) == (0, "5\n"), screen
    assert re.search(r"step [1-4]", screen) and re.search(r"[1-4]/5", screen), screen
    task_id = re.search(r"[0-9a-f]{8}-[0-9a-f-]{27}", screen)
    assert task_id, screen
    lines = ok(home, "events", task_id.group(0)).splitlines()
    progress = [line.split("\t")[-1] for line in lines if "\tprogress\t" in line]
    assert progress[-1] == "5/5 (100%) step 5" and len(progress) >= 3

    quiet = home.enqueue("opstasks:steps", "3", "0.3")
    waited = home.run("result", quiet, "--wait")  # no terminal: the value only
    assert (waited.returncode, waited.stdout, waited.stderr) == (0, "3\n", "")
    shown = _tail_until(home, quiet, "3/3 (100%) step 3")
    assert all("\tprogress\t" in line for line in shown)


def _tail_until(home: ServerHome, task_id: str, text: str) -> list[str]:
    """`omniq tail --since 1h --type progress --task ID` until `text` shows; its lines."""
    proc = subprocess.Popen([*CLI, "tail", "--since", "1h", "--type", "progress", "--task",
                             task_id], cwd=home.path, env=home.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while not lines or text not in lines[-1]:
            assert time.monotonic() < deadline, lines
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            lines.append(line.rstrip("\n"))
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    return lines


# --- dependencies ---------------------------------------------------------------------------


@pytest.mark.parametrize("tech", DURABLE)
def test_dependencies_done_failed_and_never(tech: str, deploy: Deploy) -> None:
    home = deploy(tech)
    home.start_worker()
    first = home.enqueue("omniq.examples:add", "2", "3")
    assert ok(home, "result", first, "--wait", "--timeout", "30s") == "5\n"
    # Done before the dependent is enqueued: it runs at once, with the result passed.
    later = home.run("enqueue", "omniq.examples:add", "10", "--after", first, "--pass-result",
                     "--wait", "--wait-timeout", "30s")
    assert (later.returncode, later.stdout) == (0, "15\n"), later.stderr

    bad = home.enqueue("omniq.examples:fail", "no")
    dependent = home.enqueue("omniq.examples:add", "1", "1", "--after", bad)
    failed = home.run("result", dependent, "--wait", "--timeout", "30s")
    assert failed.returncode == 1
    assert f"DependencyFailed: dependency failed: task {bad} ended failed" in failed.stderr
    assert home.events(dependent) == ["enqueued", "failed"]  # it never started

    never = home.enqueue("omniq.examples:add", "1", "1", "--delay", "1h")
    waiting = home.enqueue("omniq.examples:add", "2", "2", "--after", never, "--after", first)
    home.poll(lambda: _scheduled(home) == 2, 30, "both shown as scheduled")
    time.sleep(1.0)  # looked at (and handed back) by the worker meanwhile
    assert home.run("result", waiting).returncode == 3
    assert home.events(waiting) == ["enqueued"]
    # Still waiting (a worker may hold it for a moment while it looks again).
    home.poll(lambda: _scheduled(home) == 2, 30, "both still shown as scheduled")
    (event,) = json_lines(ok(home, "events", waiting, "--json"))
    assert event["details"]["after"] == [never, first]


def _scheduled(home: ServerHome) -> int:
    queues = json.loads(ok(home, "status", "--json"))["queues"]
    return sum(q["scheduled"] for q in queues if q["queue"] == "default")


# --- a shell task's output --------------------------------------------------------------------


@pytest.mark.parametrize("tech", DURABLE)
def test_logs_follow_a_shell_task_live(tech: str, deploy: Deploy) -> None:
    home = deploy(tech)
    home.start_worker("--allow-shell")
    task_id = home.enqueue("--sh", "echo one; sleep 1.5; echo two >&2; sleep 1.5; echo three")
    follow = subprocess.Popen([*CLI, "logs", task_id, "--follow"], cwd=home.path,
                              env=home.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    assert follow.stdout is not None
    assert follow.stdout.readline() == "one\n"
    assert "completed" not in home.events(task_id)  # seen while it still runs
    out, err = follow.communicate(timeout=60)
    assert (follow.returncode, "one\n" + out, err) == (0, "one\nthree\n", "two\n")
    kept = home.run("logs", task_id)
    assert (kept.returncode, kept.stdout, kept.stderr) == (0, "one\nthree\n", "two\n")
    chunks = json_lines(ok(home, "logs", task_id, "--json"))
    assert [(c["stream"], c["text"]) for c in chunks] == [("stdout", "one\nthree\n"),
                                                           ("stderr", "two\n")]
    python = home.enqueue("omniq.examples:add", "1", "1")
    refused = home.run("logs", python)
    assert refused.returncode == 5 and "not a shell command" in refused.stderr


@pytest.mark.parametrize(("answer", "code", "left"), [("y\n", 0, 0), ("n\n", 5, 1)])
def test_purge_failed_asks_on_a_terminal(deploy: Deploy, answer: str, code: int,
                                         left: int) -> None:
    home = deploy("sqlite")
    home.submit("omniq.examples:fail", "boom")
    home.burst()
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([*CLI, "purge", "--failed", "--since", "1h"], cwd=home.path,
                                env=home.env, stdin=terminal, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        os.write(controller, answer.encode())
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert proc.returncode == code, err
    assert "Delete 1 failed task failed in the last 1h? [y/N]" in err
    assert len(json_lines(ok(home, "failed", "--json"))) == left
