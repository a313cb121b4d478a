"""Clock steps on SQLite with real `omniq worker` processes (issue 8, item 5).

Worker A runs on the machine's clock, worker B under `faketime` an hour off. A lease ends
when its holder's heartbeats stop, as each worker sees it on its own monotonic clock:
B neither takes a live task from A (clock ahead) nor waits an hour for a dead one
(clock behind). faketime is installed in CI; elsewhere these tests skip without it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from omniq.models import utcnow
from tests import servers
from tests.acceptance import test_server_backends as backends
from tests.acceptance.test_resilience import kinds_and_attempts, worker_id
from tests.acceptance.test_server_backends import Deploy, ServerHome
from tests.acceptance.test_worker_daemon import WorkerProcess

deploy = backends.deploy  # the fixture, shared with test_server_backends.py

LEASE = 2.0  # heartbeats every LEASE / 3 (the worker's default)
STEPS = {"+1h": 3600.0, "-1h": -3600.0}

FakeTime = Callable[[str], dict[str, str]]


@pytest.fixture
def faketime() -> FakeTime:
    """faketime(step) -> the environment that runs a program with its clock `step` off.

    The library that the installed `faketime` wrapper preloads, without the wrapper
    itself: the wrapper would stand between the test and the worker (signals, exit code).
    """
    wrapper = shutil.which("faketime")
    servers.require(None if wrapper else "faketime is not installed", "faketime")
    assert wrapper is not None
    # -f: FAKETIME's own format ("+1h"), which the wrapper's date parsing refuses.
    shown = subprocess.run(
        [wrapper, "-f", "+0", "/usr/bin/env"], capture_output=True, text=True, check=True
    ).stdout
    preload = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    return lambda step: {"LD_PRELOAD": preload["LD_PRELOAD"], "FAKETIME": step}


def clock_offset(home: ServerHome, task_id: str, attempt: int) -> float:
    """How far the clock of the worker that started `attempt` was from ours (seconds)."""
    started = [e for e in home.api.get_events(task_id)
               if e.event_type.value == "started" and e.attempt == attempt]
    assert len(started) == 1, started
    return (started[0].timestamp - utcnow()).total_seconds()


def stop(*workers: WorkerProcess) -> None:
    for worker in workers:
        if worker.proc.poll() is None:
            worker.send(signal.SIGTERM)
            assert worker.wait() == 0, worker.log
        assert "Traceback" not in worker.log, worker.log


def test_a_worker_an_hour_ahead_leaves_a_live_lease_alone(
    deploy: Deploy, faketime: FakeTime
) -> None:
    home = deploy("sqlite", OMNIQ_WORKER_LEASE_SECONDS=str(LEASE))
    a = home.start_worker("-c", "1")
    long_task = home.enqueue("omniq.examples:sleep", "7", "done")
    home.poll(lambda: "started" in home.events(long_task), 30, "A started the long task")
    b = home.start_worker("-c", "1", env=faketime("+1h"))
    # B claims while A holds the long task: it runs what it is free to run.
    quick = home.enqueue("omniq.examples:add", "1", "2")
    assert home.outcome(quick).worker_id == worker_id(b.log)
    assert abs(clock_offset(home, quick, 1) - STEPS["+1h"]) < 300  # B's clock is ahead

    result = home.outcome(long_task)
    assert (result.status.value, result.value, result.attempts) == ("completed", "done", 1)
    assert result.worker_id == worker_id(a.log)
    assert kinds_and_attempts(home, long_task) == [
        ("enqueued", 0), ("started", 1), ("completed", 1)
    ]
    assert long_task not in b.log
    stop(a, b)


@pytest.mark.parametrize("step", list(STEPS))
def test_a_killed_workers_task_is_taken_over_after_about_the_lease(
    step: str, deploy: Deploy, faketime: FakeTime
) -> None:
    home = deploy("sqlite", OMNIQ_WORKER_LEASE_SECONDS=str(LEASE))
    a = home.start_worker("-c", "1")
    task_id = home.enqueue("omniq.examples:sleep", "6", "done", "--retries", "1")
    home.poll(lambda: "started" in home.events(task_id), 30, "A started the task")
    b = home.start_worker("-c", "1", env=faketime(step))
    time.sleep(LEASE)  # B watches A's heartbeats for a lease: it leaves the task alone
    assert kinds_and_attempts(home, task_id) == [("enqueued", 0), ("started", 1)]

    a.proc.kill()
    killed = time.monotonic()
    assert a.proc.wait(30) == -signal.SIGKILL
    home.poll(
        lambda: ("started", 2) in kinds_and_attempts(home, task_id), 30, "B took the task over"
    )
    waited = time.monotonic() - killed
    # Not at once (A beat until it died), and not an hour late: about one lease.
    assert LEASE / 2 <= waited <= LEASE + 5, waited
    assert abs(clock_offset(home, task_id, 2) - STEPS[step]) < 300  # B's clock was off

    result = home.outcome(task_id)
    assert (result.status.value, result.value, result.attempts) == ("completed", "done", 2)
    assert result.worker_id == worker_id(b.log)
    assert kinds_and_attempts(home, task_id) == [
        ("enqueued", 0), ("started", 1), ("started", 2), ("completed", 2)
    ]
    stop(b)
