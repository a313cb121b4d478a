"""Operator commands: `omniq status`, `cancel`, `retry` and `purge`."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import time
from typing import Any

import pytest

from tests.acceptance.conftest import CLI, run_burst, run_omniq, start_omniq

UNKNOWN_ID = "01900000-0000-7000-8000-000000000000"


def enqueue(env: dict[str, str], *args: str) -> str:
    code, out, err = run_omniq(["enqueue", *args], env)
    assert code == 0, err
    return out.strip()


def status(env: dict[str, str]) -> dict[str, Any]:
    code, out, err = run_omniq(["status", "--json"], env)
    assert code == 0, err
    record: dict[str, Any] = json.loads(out)
    return record


def counts(env: dict[str, str]) -> dict[str, dict[str, int]]:
    return {q.pop("queue"): q for q in status(env)["queues"]}


def test_status_counts_and_plain_lines(cli_env: dict[str, str]) -> None:
    enqueue(cli_env, "omniq.examples:add", "1", "2")
    enqueue(cli_env, "omniq.examples:add", "1", "2")
    enqueue(cli_env, "omniq.examples:add", "1", "2", "-q", "mail", "--delay", "1h")
    assert counts(cli_env) == {
        "default": {"queued": 2, "scheduled": 0, "running": 0, "failed": 0},
        "mail": {"queued": 0, "scheduled": 1, "running": 0, "failed": 0},
    }
    code, out, _ = run_omniq(["status"], cli_env)
    assert code == 0
    assert "queue default queued=2 scheduled=0 running=0 failed=0" in out.splitlines()
    assert status(cli_env)["workers"] == []


def test_status_lists_live_workers_and_their_current_task(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "OMNIQ_WORKER_LEASE_SECONDS": "1.5"}  # heartbeats every 0.5s
    task_id = enqueue(env, "omniq.examples:sleep", "4", "-q", "slow")
    worker = start_omniq(["worker", "-q", "slow"], env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = status(env)["workers"]
            if workers and task_id in workers[0]["current_tasks"]:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"worker with task {task_id} not listed: {workers}")
        info = workers[0]
        assert info["pid"] == worker.pid and info["queues"] == ["slow"]
        assert info["host"] and info["heartbeat_at"].endswith("Z")
        _code, out, _ = run_omniq(["status"], env)
        line = next(t for t in out.splitlines() if t.startswith("worker "))
        assert f"pid={worker.pid}" in line and f"current={task_id}" in line
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)
    assert worker.returncode == 0


def test_cancel(cli_env: dict[str, str]) -> None:
    task_id = enqueue(cli_env, "omniq.examples:add", "1", "2", "--delay", "1h")
    code, out, err = run_omniq(["cancel", task_id], cli_env)
    assert (code, out) == (0, f"cancelled {task_id} before it ran\n"), err
    code, _, err = run_omniq(["result", task_id], cli_env)
    assert code == 1 and "cancelled" in err
    code, out, err = run_omniq(["cancel", task_id, "--json"], cli_env)
    assert code == 5 and json.loads(out) == {
        "task_id": task_id, "outcome": "already_finished", "cancelled": False,
        "status": "cancelled"}
    assert "had already finished (cancelled): nothing to cancel" in err
    assert run_omniq(["cancel", UNKNOWN_ID], cli_env)[0] == 4
    assert run_omniq(["cancel", "12345"], cli_env)[0] == 2


def test_retry_a_failed_task(cli_env: dict[str, str]) -> None:
    failed = enqueue(cli_env, "omniq.examples:fail", "again")
    done = enqueue(cli_env, "omniq.examples:add", "1", "2")
    run_burst(cli_env)
    code, out, err = run_omniq(["retry", failed], cli_env)
    assert code == 0, err
    assert out.strip() == failed  # the same task runs again
    run_burst(cli_env)
    code, _, err = run_omniq(["result", failed], cli_env)
    assert code == 1 and "RuntimeError: again" in err
    code, _, err = run_omniq(["retry", done], cli_env)
    assert code == 5 and "has not failed" in err  # refused: it completed
    assert run_omniq(["retry", UNKNOWN_ID], cli_env)[0] == 4


def test_purge_needs_yes_without_a_terminal(cli_env: dict[str, str]) -> None:
    enqueue(cli_env, "omniq.examples:add", "1", "2")
    code, out, err = run_omniq(["purge", "--all-queues"], cli_env)
    assert (code, out) == (2, "") and "--yes" in err
    assert counts(cli_env)["default"]["queued"] == 1
    code, out, err = run_omniq(["purge", "--queue", "default", "--yes", "--json"], cli_env)
    assert code == 0, err
    assert json.loads(out) == {"tasks": 1}
    assert counts(cli_env).get("default", {}).get("queued", 0) == 0


def test_purge_old_results_and_events(cli_env: dict[str, str]) -> None:
    task_id = enqueue(cli_env, "omniq.examples:add", "1", "2")
    run_burst(cli_env)
    code, out, err = run_omniq(["purge", "--results-older-than", "1d", "--yes"], cli_env)
    assert (code, out) == (0, "purged 0 results\n"), err
    time.sleep(0.05)  # results "older than 0s" must have finished strictly before now
    code, out, err = run_omniq(
        ["purge", "--results-older-than", "0s", "--events-older-than", "0s", "-y"], cli_env
    )
    assert code == 0, err
    assert out.startswith("purged 1 results, ") and "events" in out
    assert run_omniq(["result", task_id], cli_env)[0] == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "nothing to purge"),
        (["--queue", "a", "--all-queues"], "not both"),
        (["--events-older-than", "week"], "invalid duration"),
        (["--queue", "../x"], "invalid queue name"),
    ],
)
def test_purge_mistakes(cli_env: dict[str, str], args: list[str], message: str) -> None:
    code, out, err = run_omniq(["purge", "--yes", *args], cli_env)
    assert code == 2 and out == "" and message in err


@pytest.mark.parametrize(("answer", "code", "left"), [("y\n", 0, 0), ("n\n", 5, 1)])
def test_purge_asks_on_a_terminal(
    cli_env: dict[str, str], answer: str, code: int, left: int
) -> None:
    enqueue(cli_env, "omniq.examples:add", "1", "2")
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*CLI, "purge", "--all-queues"],
            env=cli_env,
            cwd=os.path.dirname(cli_env["OMNIQ_HOME"]),
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(controller, answer.encode())
        _out, err = proc.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert proc.returncode == code, err
    assert "Delete every waiting and failed task of every queue? [y/N]" in err
    assert counts(cli_env).get("default", {}).get("queued", 0) == left
