"""Delivery guarantees under faults with the real `omniq` command (issue 8).

- A stalled worker (SIGSTOP past its lease) wakes after another worker completed its
  task: exactly one outcome stays stored, one outcome event, and the late worker says so
  in one warning and acks nothing.
- Bytes that are not a task, written over a waiting task's payload with the
  technology's own client: the worker records a failed outcome and goes on.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from tests.acceptance.test_resilience import DURABLE, worker_id
from tests.acceptance.test_server_backends import Deploy, ServerHome
from tests.acceptance.test_server_backends import deploy as deploy  # the fixture
from tests.backends.conftest import TECHS

MIXED = ("redis", "postgres", "nats")  # queue, results, events on three technologies


def layouts() -> list[Any]:
    return [*DURABLE, pytest.param(MIXED, id="mixed")]


@pytest.mark.parametrize("techs", layouts())
def test_a_stalled_workers_late_outcome_loses(techs: Any, deploy: Deploy) -> None:
    home = deploy(techs, OMNIQ_WORKER_LEASE_SECONDS="2")
    stalled = home.start_worker("-c", "1")
    task_id = home.enqueue("omniq.examples:sleep", "3", "done", "--retries", "1")
    home.poll(lambda: "started" in home.events(task_id), 30, "the first STARTED event")
    stalled.send(signal.SIGSTOP)
    try:
        taker = home.start_worker("-c", "1")
        result = home.outcome(task_id, 60)
    finally:
        stalled.send(signal.SIGCONT)
    assert (result.status.value, result.value, result.attempts) == ("completed", "done", 2)
    assert result.worker_id == worker_id(taker.log)
    # The stalled worker wakes, finishes its sleep and tries to store its outcome.
    late = f"task {task_id} sleep@default another outcome was stored first"
    home.poll(lambda: late in stalled.log, 30, "the stalled worker's warning")
    for worker in (stalled, taker):
        worker.send(signal.SIGTERM)
        assert worker.wait() == 0, worker.log
    assert stalled.log.count(late) == 1
    assert home.api.wait_result(task_id, timeout=0) == result  # still the first one
    events = home.api.get_events(task_id)
    assert [(e.event_type.value, e.attempt) for e in events] == [
        ("enqueued", 0), ("started", 1), ("started", 2), ("completed", 2)
    ]
    assert all(s.running == s.failed == s.queued == 0 for s in home.api.stats())


CORRUPT = {
    "bytes": b"\x00\x01 not json at all",
    "newer-format": b'{"v": 99, "id": "x", "func": "omniq.examples:add"}',
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
@pytest.mark.parametrize("tech", DURABLE)
def test_a_corrupt_task_is_failed_and_the_worker_goes_on(
    tech: str, kind: str, deploy: Deploy
) -> None:
    home = deploy(tech)
    bad = home.enqueue("omniq.examples:add", "1", "2", "--priority", "5")
    good = home.enqueue("omniq.examples:add", "2", "2")
    corrupt(home, tech, bad, CORRUPT[kind])
    burst = home.run("worker", "--burst")
    assert burst.returncode == 0, burst.stderr
    lines = [line for line in burst.stderr.splitlines() if bad in line]
    assert len(lines) == 1 and "UndecodableTask: undecodable task" in lines[0], burst.stderr
    assert "Traceback" not in burst.stderr
    shown = home.run("result", bad)
    assert shown.returncode == 1 and "UndecodableTask: undecodable task" in shown.stderr
    assert "Traceback" not in shown.stderr + shown.stdout
    events = home.run("events", bad)
    assert events.returncode == 0 and "failed" in events.stdout, events.stderr
    status = home.run("status")
    assert status.returncode == 0 and "Traceback" not in status.stderr
    assert home.run("result", good).stdout.strip() == "4"
    again = home.run("worker", "--burst")  # nothing left at the head of the queue
    assert again.returncode == 0 and "0 tasks done" in again.stderr


def corrupt(home: ServerHome, tech: str, task_id: str, payload: bytes) -> None:
    """Overwrite the stored payload with the technology's own client (the
    conformance suite's `corrupt_task` hook), as a bad write by someone else would."""
    from omniq import registry
    from omniq.config import OmniQConfig

    hook = TECHS[tech].corrupt_task
    kind, settings = OmniQConfig.load(env=home.env, use_files=False).store("task_queue")

    async def run() -> None:
        store = registry.create(kind, "queue", settings)
        await store.open()
        try:
            await hook(store, task_id, "default", payload)
        finally:
            await store.close()

    asyncio.run(run())
    time.sleep(0.05)
