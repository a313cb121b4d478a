"""At-least-once and outages with the real `omniq worker`: SIGKILL mid-task, server restarts.

A killed worker's task is redelivered once its lease expires and ends with one outcome
(shared servers: no server is harmed). A restarted server (a private instance on a free
port, never the shared one) costs the worker one log line and nothing else.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from tests import servers
from tests.acceptance import test_server_backends as backends
from tests.acceptance.test_server_backends import SERVER_TECHS, Deploy, ServerHome, check_report

deploy = backends.deploy  # the fixture, shared with test_server_backends.py

DURABLE = (*SERVER_TECHS, "sqlite", "file")
PASSWORD = "Restart-S3cret"
OUTAGE = "store unavailable"  # the worker's outage line (omniq.worker._log_outage)
RECOVERED = "store reachable again"


def worker_id(log: str) -> str:
    found = re.search(r"worker (\S+) started: ", log)
    assert found, log
    return found.group(1)


def kinds_and_attempts(home: ServerHome, task_id: str) -> list[tuple[str, int]]:
    return [(e.event_type.value, e.attempt) for e in home.api.get_events(task_id)]


# --- SIGKILL mid-task --------------------------------------------------------------------------


@pytest.mark.parametrize("tech", DURABLE)
def test_task_of_a_killed_worker_is_redelivered_and_completed_once(
    tech: str, deploy: Deploy
) -> None:
    home = deploy(tech, OMNIQ_WORKER_LEASE_SECONDS="2")
    first = home.start_worker("-c", "1")
    task_id = home.enqueue("omniq.examples:sleep", "3", "done", "--retries", "1")
    home.poll(lambda: "started" in home.events(task_id), 30, "the first STARTED event")
    first.proc.kill()
    assert first.proc.wait(30) == -signal.SIGKILL

    second = home.start_worker("-c", "1")
    result = home.outcome(task_id)
    assert (result.status.value, result.value, result.attempts) == ("completed", "done", 2)
    assert result.worker_id == worker_id(second.log)
    events = home.api.get_events(task_id)
    assert [(e.event_type.value, e.attempt) for e in events] == [
        ("enqueued", 0), ("started", 1), ("started", 2), ("completed", 2)
    ]
    assert [e.worker_id for e in events[1:]] == [
        worker_id(first.log), worker_id(second.log), worker_id(second.log)
    ]
    second.send(signal.SIGTERM)
    assert second.wait() == 0
    assert second.log.count(f"task {task_id} sleep@default completed") == 1
    assert all(s.queued == s.running == 0 for s in home.api.stats())


@pytest.mark.parametrize("tech", DURABLE)
def test_a_task_that_kills_its_worker_ends_failed_and_the_others_flow(
    tech: str, deploy: Deploy
) -> None:
    """A poison task (os._exit in the task) with --retries 1: two worker deaths, then a
    failed outcome `worker lost`; good tasks queued behind it all complete."""
    home = deploy(tech, OMNIQ_WORKER_LEASE_SECONDS="1")
    poison = home.enqueue("omniq.examples:crash", "--retries", "1", "--priority", "9")
    good = [home.enqueue("omniq.examples:add", str(i), "1") for i in range(5)]
    everything = [poison, *good]
    worker, deaths = home.start_worker("-c", "1"), 0
    deadline = time.monotonic() + 90
    while not all(_finished(home, t) for t in everything):
        assert time.monotonic() < deadline, f"not done after {deaths} worker deaths"
        if worker.proc.poll() is not None:  # what systemd's Restart=always does
            assert worker.proc.returncode == 13
            deaths += 1
            worker = home.start_worker("-c", "1")
        time.sleep(0.2)
    worker.send(signal.SIGTERM)
    assert worker.wait() == 0
    assert deaths == 2
    result = home.outcome(poison)
    assert (result.status.value, result.error_type) == ("failed", "omniq.errors.WorkerLost")
    assert (result.error_message or "").startswith("worker lost")
    assert result.attempts == 2
    assert kinds_and_attempts(home, poison) == [
        ("enqueued", 0), ("started", 1), ("started", 2), ("failed", 2)
    ]
    assert [home.outcome(t).value for t in good] == [1, 2, 3, 4, 5]


def _finished(home: ServerHome, task_id: str) -> bool:
    return any(k in ("completed", "failed") for k in home.events(task_id))


# --- server restarts ---------------------------------------------------------------------------


class OutageLoggedMoreThanOnce(AssertionError):
    """The worker's log holds more than the one outage line and the one recovery line."""


RESTARTED = list(SERVER_TECHS)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
@pytest.mark.parametrize("tech", RESTARTED)
def test_worker_rides_out_a_server_restart(tech: str, busy: bool, deploy: Deploy) -> None:
    with servers.private_server(tech, password=PASSWORD) as server:
        # A lease longer than the outage: the running task is not handed to anyone else.
        home = deploy(tech, where={tech: server.url}, OMNIQ_WORKER_LEASE_SECONDS="30")
        worker = home.start_worker("-c", "2")
        expected: dict[str, object] = {home.enqueue("omniq.examples:add", "1", "2"): 3}
        if busy:
            running = home.enqueue("omniq.examples:sleep", "4", "slept")
            expected[running] = "slept"
            home.poll(lambda: "started" in home.events(running), 30, "the sleeper started")
        else:
            for task_id in expected:
                home.outcome(task_id)  # done: the worker waits for work when the server stops

        down_since = time.monotonic()
        server.stop()
        worker.wait_log(OUTAGE, 60)
        rows = check_report(home.run("config", "check"), PASSWORD)
        assert [row.split()[0] for row in rows] == [
            "task_queue", "result_storage", "event_storage"
        ]
        time.sleep(max(0.0, 1.5 - (time.monotonic() - down_since)))
        server.start()

        expected[home.enqueue("omniq.examples:add", "3", "4")] = 7
        for task_id, value in expected.items():
            result = home.outcome(task_id, 90)
            assert (result.status.value, result.value) == ("completed", value), task_id
            assert [k for k, _ in kinds_and_attempts(home, task_id)] == [
                "enqueued", "started", "completed"
            ]
        check = home.run("config", "check")
        assert check.returncode == 0, check.stdout + check.stderr

        worker.wait_log(RECOVERED, 30)
        assert worker.proc.poll() is None, worker.log  # it carried on
        worker.send(signal.SIGTERM)
        assert worker.wait() == 0
        log = worker.log
        assert PASSWORD not in log and "Traceback" not in log
        alarms = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
        # The outage, once, and its end; nothing else.
        if len(alarms) != 2 or OUTAGE not in alarms[0] or RECOVERED not in alarms[1]:
            raise OutageLoggedMoreThanOnce(log)
