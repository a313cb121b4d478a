"""omniq.threads: jobs on threads, outcomes delivered on the caller's loop in batches
(TaskThreads for sync tasks, the SQLite store thread, storage.BlockingRunner)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

from omniq import threads
from omniq.storage import BlockingRunner
from omniq.threads import Job, Outcome, TaskThreads, Threads, run_each


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


# --- the one primitive: batches, orphans, lingering, fork ---------------------------------


def test_jobs_queued_behind_a_busy_thread_run_as_one_batch() -> None:
    batches: list[int] = []

    def batch(jobs: list[Job[Any]]) -> list[Outcome]:
        batches.append(len(jobs))
        return run_each(jobs)

    async def main() -> None:
        pool = Threads("t-batch", batch=batch, batch_most=64)
        assert await pool.run(lambda: "started") == "started"
        gate = threading.Event()
        first = pool.run(gate.wait, 10)
        rest = [pool.run(lambda i=i: i) for i in range(20)]
        gate.set()
        assert await first is True
        assert await asyncio.gather(*rest) == list(range(20))
        pool.shutdown(wait=True)

    asyncio.run(main())
    assert max(batches) > 1 and sum(batches) == 22


def test_a_value_whose_caller_gave_up_goes_to_its_orphan_handler() -> None:
    orphaned: list[int] = []

    async def main() -> None:
        pool = Threads("t-orphan")
        gate = threading.Event()
        job = Job(lambda: (gate.wait(10), 42)[1], (), orphan=orphaned.append)
        waiting = asyncio.create_task(pool.call(job))
        await asyncio.sleep(0.05)
        waiting.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await pool.run(lambda: "after") == "after"  # its outcome was delivered first
        pool.shutdown(wait=True)

    asyncio.run(main())
    assert orphaned == [42]


def test_lingering_counts_only_threads_still_running_a_job() -> None:
    async def main() -> None:
        pool = TaskThreads(asyncio.get_running_loop(), 3)
        assert await pool.run(lambda: 1) == 1
        release = threading.Event()
        busy = pool.run(release.wait, 30)
        await asyncio.sleep(0.05)
        pool.shutdown()  # idle threads leave, the busy one stays with its job
        assert pool.lingering(grace=0.1) == 1
        assert threads.lingering(grace=0.1) >= 1
        release.set()
        assert await busy is True
        assert pool.lingering(grace=2) == 0

    asyncio.run(main())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_jobs_on_threads_of_its_own() -> None:
    pool = BlockingRunner("t-fork")

    async def thread_of_job() -> threading.Thread:
        return await pool.run(threading.current_thread)

    before = asyncio.run(thread_of_job())
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            ran_on = asyncio.run(thread_of_job())
            code = 0 if ran_on is not before and ran_on.is_alive() else 1
            pool.shutdown()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert asyncio.run(thread_of_job()) is before  # the parent's thread carries on
    pool.shutdown()


def test_posted_jobs_run_and_shutdown_waits_for_them() -> None:
    done: list[int] = []
    pool = BlockingRunner("t-post")
    for i in range(5):
        pool.post(Job(lambda i=i: (time.sleep(0.01), done.append(i)), ()))
    pool.shutdown()  # the file backend's runner: waits
    assert done == [0, 1, 2, 3, 4]
