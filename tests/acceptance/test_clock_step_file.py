"""Clock steps on the file queue with the real `omniq worker` (issue 8, item 5).

The file queue has no server clock. A lease used to carry a wall-clock deadline that
other processes compared with their own clocks, so a worker whose clock was an hour
ahead took over a running task at once, and one an hour behind kept a dead lease
alive for an hour. Leases now expire when their heartbeats stop, judged by each
process's own monotonic clock. The stepped worker runs under libfaketime, set up
from what the `faketime` command itself sets (so signals reach the worker itself,
not the `faketime` wrapper that would otherwise sit in between).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from tests import servers
from tests.acceptance import test_server_backends as backends
from tests.acceptance.test_resilience import kinds_and_attempts, worker_id
from tests.acceptance.test_server_backends import Deploy, ServerHome

deploy = backends.deploy  # the fixture, shared with test_server_backends.py

LEASE = 2.0  # seconds; heartbeats every LEASE / 3


def faketime_env(offset: str) -> dict[str, str]:
    """The variables `faketime -f OFFSET` gives the program it runs (no shared clock)."""
    faketime = shutil.which("faketime")
    servers.require(None if faketime else "the faketime command is not installed", "faketime")
    assert faketime is not None
    out = subprocess.run(
        [faketime, "-f", offset, "env", "-0"], capture_output=True, check=True, timeout=30
    ).stdout.decode()
    env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    return {key: env[key] for key in ("LD_PRELOAD", "FAKETIME")}


def started_attempts(home: ServerHome, task_id: str) -> list[int]:
    # Sorted: events are ordered by their writers' clocks, one of which is an hour off.
    return sorted(a for kind, a in kinds_and_attempts(home, task_id) if kind == "started")


def taken_over(home: ServerHome, task_id: str, since: float) -> float:
    """Seconds from `since` until the task's second STARTED event is stored."""
    home.poll(lambda: started_attempts(home, task_id) == [1, 2], 30, "the second STARTED")
    return time.monotonic() - since


def test_a_worker_an_hour_ahead_waits_for_the_heartbeats_to_stop(deploy: Deploy) -> None:
    ahead = faketime_env("+1h")
    home = deploy("file", OMNIQ_WORKER_LEASE_SECONDS=str(LEASE))
    first = home.start_worker("-c", "1")
    task_id = home.enqueue("omniq.examples:sleep", "10", "done", "--retries", "1")
    home.poll(lambda: started_attempts(home, task_id) == [1], 30, "the first STARTED")

    stepped = home.start_worker("-c", "1", env=ahead)
    time.sleep(2.5 * LEASE)  # the first worker's lease, renewed all along, is alive
    assert started_attempts(home, task_id) == [1], stepped.log
    assert first.proc.poll() is None

    first.proc.kill()
    killed = time.monotonic()
    assert first.proc.wait(30) == -signal.SIGKILL
    took = taken_over(home, task_id, killed)
    # About one lease after the last heartbeat: never at once, and not an hour later.
    assert LEASE / 2 <= took <= 5 * LEASE, took
    result = home.outcome(task_id)
    assert (result.status.value, result.value, result.attempts) == ("completed", "done", 2)
    assert result.worker_id == worker_id(stepped.log)
    stepped.send(signal.SIGTERM)
    assert stepped.wait() == 0


def test_a_worker_an_hour_behind_does_not_keep_a_dead_lease(deploy: Deploy) -> None:
    behind = faketime_env("-1h")
    home = deploy("file", OMNIQ_WORKER_LEASE_SECONDS=str(LEASE))
    first = home.start_worker("-c", "1")
    task_id = home.enqueue("omniq.examples:sleep", "3", "done", "--retries", "1")
    home.poll(lambda: started_attempts(home, task_id) == [1], 30, "the first STARTED")
    stepped = home.start_worker("-c", "1", env=behind)

    first.proc.kill()
    killed = time.monotonic()
    assert first.proc.wait(30) == -signal.SIGKILL
    # The dead lease's deadline, in the old names, lay an hour ahead of this worker's clock.
    took = taken_over(home, task_id, killed)
    assert took <= 5 * LEASE, took
    result = home.outcome(task_id)
    assert (result.status.value, result.value, result.attempts) == ("completed", "done", 2)
    assert result.worker_id == worker_id(stepped.log)
    stepped.send(signal.SIGTERM)
    assert stepped.wait() == 0


def test_faketime_steps_the_clock_of_the_worker_it_is_given_to() -> None:
    """Guards the tests above against a libfaketime that silently does nothing."""
    env = {**os.environ, **faketime_env("+1h")}
    code = "import time; print(time.time())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=30).stdout
    assert float(out) - time.time() > 3000
