"""A worker stops even when a background duty swallows its cancellation (Python 3.11's
asyncio.wait_for can, gh-86296): the wait for its duties is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import pytest

from omniq.backends.memory import MemoryEventStorage, MemoryQueue, MemoryResultStorage
from omniq.models import Task
from omniq.worker import Worker, WorkerSettings

FAST = WorkerSettings(poll_interval=0.02, lease=5.0, register=False, cleanup_interval=3600,
                      burst=True)


def _worker() -> Worker:
    return Worker(MemoryQueue(), MemoryResultStorage(), MemoryEventStorage(), FAST)


async def _swallows_one_cancel() -> None:
    # As wait_for does when its cancellation races the awaited result.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)
    await asyncio.sleep(3600)  # goes on: only a second cancel stops it


async def _swallows_every_cancel() -> None:
    # For longer than the worker waits (it then ends, so that the test's loop can close).
    deadline = time.monotonic() + 5.5
    while time.monotonic() < deadline:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(deadline - time.monotonic())


def _stop_within(worker: Worker, seconds: float) -> float:
    """How long the burst worker took to return; fails after `seconds`. The loop runs
    on a thread of its own: a hung shutdown cannot be cancelled from its own loop."""
    took: list[float] = []

    async def main() -> None:
        await worker.queue.enqueue(Task(func="omniq.examples:add", args=(1, 2)))
        began = time.monotonic()
        assert await worker.run() == 1
        took.append(time.monotonic() - began)
        returned.set()

    returned = threading.Event()
    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert returned.wait(seconds), f"the worker did not stop within {seconds}s"
    thread.join(seconds)
    return took[0]


def test_a_duty_that_swallows_one_cancel_is_cancelled_again() -> None:
    worker = _worker()
    worker._cancel_loop = _swallows_one_cancel  # type: ignore[method-assign]
    assert _stop_within(worker, 15) < 5


def test_a_duty_that_never_stops_is_left_behind_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = _worker()
    worker._heartbeat_loop = _swallows_every_cancel  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="omniq.worker"):
        assert _stop_within(worker, 20) < 10
    assert "did not stop" in caplog.text and "_swallows_every_cancel" in caplog.text
