"""TaskThreads: sync callables on threads, outcomes delivered on the loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from omniq.threads import TaskThreads


def test_values_and_errors_reach_the_loop() -> None:
    async def main() -> None:
        threads = TaskThreads(asyncio.get_running_loop(), 4)
        loop_thread = threading.get_ident()
        values = await asyncio.gather(*(threads.run(lambda i=i: i * i) for i in range(200)))
        assert values == [i * i for i in range(200)]
        assert await threads.run(threading.get_ident) != loop_thread
        with pytest.raises(ZeroDivisionError):
            await threads.run(lambda: 1 / 0)
        threads.shutdown()

    asyncio.run(main())


def test_replace_stuck_keeps_capacity() -> None:
    async def main() -> None:
        threads = TaskThreads(asyncio.get_running_loop(), 1)
        release = threading.Event()
        stuck = threads.run(release.wait, 30)
        threads.replace_stuck()  # the one thread is held: a new one takes the next job
        assert await asyncio.wait_for(threads.run(lambda: "next"), 10) == "next"
        release.set()
        assert await stuck is True
        threads.shutdown()

    asyncio.run(main())


def test_a_cancelled_wait_is_not_an_error() -> None:
    async def main() -> None:
        threads = TaskThreads(asyncio.get_running_loop(), 1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(threads.run(time.sleep, 0.3), 0.05)
        await asyncio.sleep(0.5)  # the outcome arrives for a cancelled future: ignored
        assert await threads.run(lambda: 7) == 7
        threads.shutdown()

    asyncio.run(main())
