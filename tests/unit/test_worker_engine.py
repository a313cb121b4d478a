"""The worker engine (omniq.worker.Worker) on in-memory stores."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from omniq.backends.memory import MemoryEventStorage, MemoryQueue, MemoryResultStorage
from omniq.models import (
    Delivery,
    EventType,
    Task,
    TaskKind,
    TaskResult,
    TaskStatus,
    utcnow,
)
from omniq.serialization import placeholder_task
from omniq.shell import SHELL_FUNC
from omniq.worker import Worker, WorkerSettings, module_allowed, retry_delay

FAST = WorkerSettings(poll_interval=0.02, lease=5.0, register=False, cleanup_interval=3600)


@dataclass
class Stores:
    queue: MemoryQueue
    results: MemoryResultStorage
    events: MemoryEventStorage

    def worker(self, worker_id: str | None = None, **settings: Any) -> Worker:
        return Worker(
            self.queue, self.results, self.events, replace(FAST, **settings), worker_id=worker_id
        )

    async def kinds(self, task_id: str) -> list[str]:
        return [e.event_type.value for e in await self.events.get(task_id)]

    async def submit(self, *tasks: Task) -> None:
        for task in tasks:
            await self.queue.enqueue(task)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 30))


def with_stores(body: Callable[..., Awaitable[None]]) -> Callable[[Path], None]:
    """A sync test that runs `body(stores)` or `body(stores, tmp_path)` on a fresh loop
    with fresh memory stores (pytest-asyncio is not a dependency)."""
    wants_path = body.__code__.co_argcount == 2

    def test(tmp_path: Path) -> None:
        async def main() -> None:
            s = Stores(MemoryQueue(), MemoryResultStorage(), MemoryEventStorage())
            await (body(s, tmp_path) if wants_path else body(s))

        run(main)

    test.__name__ = body.__name__
    test.__doc__ = body.__doc__
    return test


async def until(check: Callable[[], Awaitable[bool]], limit: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not await check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def run_until_done(s: Stores, *tasks: Task, **settings: Any) -> None:
    """Run a worker until every task has a result (burst would end while a retry waits)."""
    worker = s.worker(**settings)
    running = asyncio.create_task(worker.run())

    async def all_done() -> bool:
        return all([await s.results.get(t.id) is not None for t in tasks])

    try:
        await until(all_done)
    finally:
        worker.request_stop()
        await running


async def result_of(s: Stores, task_id: str) -> TaskResult:
    result = await s.results.get(task_id)
    assert result is not None
    return result


# --- outcomes -------------------------------------------------------------------------------


@with_stores
async def test_burst_runs_queued_tasks_then_returns(s: Stores) -> None:
    tasks = [Task(func="omniq.examples:add", args=(i, 1)) for i in range(5)]
    await s.submit(*tasks)
    done = await s.worker(burst=True).run()
    assert done == 5
    for i, task in enumerate(tasks):
        result = await result_of(s, task.id)
        assert result.status == TaskStatus.COMPLETED and result.value == i + 1
        assert result.attempts == 1
        assert await s.kinds(task.id) == ["started", "completed"]


@with_stores
async def test_burst_on_empty_queues_returns_at_once(s: Stores) -> None:
    assert await s.worker(burst=True).run() == 0


@with_stores
async def test_failure_with_retries_backs_off_then_succeeds(s: Stores, tmp_path: Path) -> None:
    marker = tmp_path / "count"
    task = Task(func="omniq.examples:flaky", args=(str(marker), 2), max_retries=3, retry_delay=0.01)
    await s.submit(task)
    await run_until_done(s, task)
    result = await result_of(s, task.id)
    assert result.status == TaskStatus.COMPLETED and result.value == 3
    assert result.attempts == 3
    events = await s.events.get(task.id)
    assert [e.event_type.value for e in events] == [
        "started",
        "retried",
        "started",
        "retried",
        "started",
        "completed",
    ]
    assert [e.attempt for e in events] == [1, 1, 2, 2, 3, 3]
    retried = [e for e in events if e.event_type == EventType.RETRIED]
    assert "flaky failure 1 of 2" in retried[0].details["error"]
    assert retried[0].details["delay"] >= 0
    assert retried[0].details["outcome"] == "failed"


@with_stores
async def test_failure_after_last_retry_is_failed_with_remote_error(s: Stores) -> None:
    task = Task(func="omniq.examples:fail", args=("nope",), max_retries=1, retry_delay=0.01)
    await s.submit(task)
    await run_until_done(s, task)
    result = await result_of(s, task.id)
    assert result.status == TaskStatus.FAILED
    assert result.attempts == 2
    assert result.error_type == "RuntimeError"
    assert result.error_message == "nope"
    assert result.traceback and "examples.py" in result.traceback
    assert await s.kinds(task.id) == ["started", "retried", "started", "failed"]
    stats = {q.queue: q for q in await s.queue.stats()}
    assert stats["default"].failed == 1  # kept as a dead letter


def test_retry_delay_is_exponential_with_equal_jitter() -> None:
    settings = WorkerSettings(retry_backoff=2.0, retry_max_delay=100.0)
    task = Task(func="m:f", retry_delay=1.0)
    for attempt, base in ((1, 1.0), (2, 2.0), (3, 4.0), (8, 100.0)):
        for _ in range(50):
            delay = retry_delay(task, attempt, settings)
            assert base / 2 <= delay <= base


@with_stores
async def test_timeout_of_a_sync_task_is_a_timeout_outcome(s: Stores) -> None:
    task = Task(func="omniq.examples:sleep", args=(3,), timeout=0.2)
    await s.submit(task)
    await s.worker(burst=True).run()
    result = await result_of(s, task.id)
    assert result.status == TaskStatus.TIMEOUT
    assert result.error_type == "TimeoutError"
    assert "0.2" in (result.error_message or "")
    assert await s.kinds(task.id) == ["started", "timeout"]


@with_stores
async def test_timeout_of_an_async_task_cancels_it(s: Stores) -> None:
    task = Task(func="omniq.examples:async_sleep", args=(30,), timeout=0.1)
    await s.submit(task)
    await s.worker(burst=True).run()
    assert (await result_of(s, task.id)).status == TaskStatus.TIMEOUT


@with_stores
async def test_timeout_with_retries_left_is_retried(s: Stores) -> None:
    task = Task(
        func="omniq.examples:async_sleep", args=(30,), timeout=0.05, max_retries=1, retry_delay=0.01
    )
    await s.submit(task)
    await run_until_done(s, task)
    result = await result_of(s, task.id)
    assert result.status == TaskStatus.TIMEOUT and result.attempts == 2
    retried = [e for e in await s.events.get(task.id) if e.event_type == EventType.RETRIED]
    assert retried[0].details["outcome"] == "timeout"


@with_stores
async def test_non_json_return_value_fails_with_a_clear_message(s: Stores) -> None:
    task = Task(func="omniq.examples:echo", args=(1,))
    bad = Task(func="builtins:object", args=())
    await s.submit(task, bad)
    await s.worker(burst=True, allowed_modules=None).run()
    assert (await result_of(s, task.id)).value == {"args": [1], "kwargs": {}}
    result = await result_of(s, bad.id)
    assert result.status == TaskStatus.FAILED
    assert result.error_type == "omniq.errors.SerializationError"
    assert "return value" in (result.error_message or "")


# --- ordering of writes ---------------------------------------------------------------------


class CheckingQueue(MemoryQueue):
    """Records, at each ack, whether the result was already stored."""

    def __init__(self, results: MemoryResultStorage) -> None:
        super().__init__()
        self.results = results
        self.stored_at_ack: list[bool] = []

    async def ack(self, delivery: Delivery, *, failed: bool = False) -> None:
        self.stored_at_ack.append(await self.results.get(delivery.task_id) is not None)
        await super().ack(delivery, failed=failed)


def test_result_is_stored_before_the_ack() -> None:
    async def main() -> None:
        results = MemoryResultStorage()
        queue = CheckingQueue(results)
        s = Stores(queue, results, MemoryEventStorage())
        await s.submit(
            Task(func="omniq.examples:add", args=(1, 2)),
            Task(func="omniq.examples:fail"),
            Task(func="omniq.examples:sleep", args=(2,), timeout=0.05),
        )
        await s.worker(burst=True).run()
        assert queue.stored_at_ack == [True, True, True]

    run(main)


@with_stores
async def test_redelivered_task_with_a_stored_result_is_acked_without_running(
    s: Stores, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    task = Task(func="omniq.examples:flaky", args=(str(marker), 0))
    await s.submit(task)
    # A first worker claimed it, stored the outcome and died before its ack.
    first = await s.queue.dequeue(["default"], 0.05, 1)
    assert first is not None and first.attempt == 1
    await s.results.store(TaskResult(task_id=task.id, status=TaskStatus.COMPLETED, value=1))
    await asyncio.sleep(0.1)  # the lease runs out: the task is delivered again
    await s.worker(burst=True).run()
    assert not marker.exists()
    assert await s.kinds(task.id) == []  # no second STARTED, no second outcome
    assert (await result_of(s, task.id)).value == 1
    assert await s.queue.get_task(task.id) is None  # acked


@with_stores
async def test_redelivered_task_without_a_result_runs_again(s: Stores) -> None:
    task = Task(func="omniq.examples:add", args=(2, 2), max_retries=1)
    await s.submit(task)
    assert await s.queue.dequeue(["default"], 0.05, 1) is not None
    await asyncio.sleep(0.1)
    await s.worker(burst=True).run()
    result = await result_of(s, task.id)
    assert result.value == 4 and result.attempts == 2


@with_stores
async def test_a_task_whose_workers_vanish_ends_failed_as_worker_lost(s: Stores) -> None:
    """A poison task (it kills its worker) must not be redelivered forever."""
    poison = Task(func="omniq.examples:echo", max_retries=1, priority=1)  # never runs again
    good = Task(func="omniq.examples:add", args=(1, 1))
    await s.submit(poison, good)
    for _ in range(2):  # two workers die running it: its retries + 1 attempts
        d = await s.queue.dequeue(["default"], 0.05, 1)
        assert d is not None and d.task.id == poison.id
        await asyncio.sleep(0.1)
    await s.worker(burst=True).run()
    result = await result_of(s, poison.id)
    assert (result.status.value, result.error_type) == ("failed", "omniq.errors.WorkerLost")
    assert result.error_message and result.error_message.startswith("worker lost")
    assert result.attempts == 2
    assert await s.kinds(poison.id) == ["failed"]  # it did not run a third time
    assert (await result_of(s, good.id)).value == 2  # and the others keep flowing
    assert await s.queue.get_task(poison.id) is not None  # a dead letter, retryable


class Undecodable(MemoryQueue):
    """Hands out one task as a store does when its payload does not decode."""

    def __init__(self, bad_id: str) -> None:
        super().__init__()
        self.bad_id = bad_id

    async def dequeue(self, queues: Any, lease: float, timeout: float) -> Delivery | None:
        d = await super().dequeue(queues, lease, timeout)
        if d is not None and d.task.id == self.bad_id:
            task = placeholder_task(d.task.id, d.task.queue)
            return replace(d, task=task, problem="task record does not decode: Expecting value")
        return d


def test_an_undecodable_task_becomes_a_failed_outcome_and_the_worker_goes_on() -> None:
    async def main() -> None:
        bad, good = Task(func="omniq.examples:add", args=(1, 2)), Task(func="omniq.examples:echo")
        s = Stores(Undecodable(bad.id), MemoryResultStorage(), MemoryEventStorage())
        await s.submit(bad, good)
        assert await s.worker(burst=True).run() == 2
        result = await result_of(s, bad.id)
        assert result.status == TaskStatus.FAILED
        assert result.error_type == "omniq.errors.UndecodableTask"
        assert result.error_message == (
            "undecodable task: task record does not decode: Expecting value"
        )
        assert result.traceback is None
        assert await s.kinds(bad.id) == ["failed"]
        assert (await result_of(s, good.id)).ok

    run(main)


@with_stores
async def test_a_stalled_workers_late_outcome_does_not_replace_the_real_one(s: Stores) -> None:
    task = Task(func="omniq.examples:async_sleep", args=(0.6, "late"), max_retries=1)
    await s.submit(task)
    # The stalled worker: its heartbeat never comes (as under SIGSTOP), its lease runs out.
    stalled = s.worker(lease=0.2, heartbeat=60, worker_id="stalled", max_tasks=1)
    first = asyncio.create_task(stalled.run())
    await until(lambda: _has(s, task.id, "started"))
    taker = s.worker(lease=5, worker_id="taker")
    second = asyncio.create_task(taker.run())
    await until(lambda: _count(s, task.id, "started", 2))
    await until(lambda: _stored(s, task.id))
    result = await result_of(s, task.id)
    await asyncio.sleep(0.8)  # the other one finishes too, later
    stalled.request_stop()
    taker.request_stop()
    await asyncio.gather(first, second)
    assert (result.worker_id, result.attempts) in {("taker", 2), ("stalled", 1)}
    assert await result_of(s, task.id) == result  # the first outcome stands
    kinds = await s.kinds(task.id)
    assert kinds.count("completed") == 1 and kinds.count("started") == 2
    assert await s.queue.get_task(task.id) is None  # acked by its holder


@with_stores
async def test_the_observer_sees_each_event_the_worker_records(s: Stores, tmp_path: Path) -> None:
    seen: list[tuple[str, str, int]] = []
    marker = tmp_path / "count"
    ok = Task(func="omniq.examples:add", args=(1, 1))
    flaky = Task(func="omniq.examples:flaky", args=(str(marker), 1), max_retries=1,
                 retry_delay=0.01)
    await s.submit(ok, flaky)
    worker = Worker(s.queue, s.results, s.events, replace(FAST),
                    observer=lambda e, t: seen.append((t.func, e.event_type.value, e.attempt)))
    running = asyncio.create_task(worker.run())
    await until(lambda: _stored(s, flaky.id))
    worker.request_stop()
    await running

    def of(func: str) -> list[tuple[str, int]]:
        return [(kind, attempt) for f, kind, attempt in seen if f == func]

    assert of(ok.func) == [("started", 1), ("completed", 1)]
    assert of(flaky.func) == [("started", 1), ("retried", 1), ("started", 2), ("completed", 2)]


@with_stores
async def test_started_is_stored_before_the_task_code_runs(s: Stores) -> None:
    seen: list[list[str]] = []

    async def probe() -> None:
        seen.append([e.event_type.value for e in await s.events.get(task.id)])

    task = Task(func="local:probe#1")
    worker = Worker(s.queue, s.results, s.events, replace(FAST, burst=True),
                    local_functions={"local:probe#1": probe})
    await s.submit(task)
    await worker.run()
    assert seen == [["started"]]


# --- what a daemon refuses ------------------------------------------------------------------


@with_stores
async def test_module_outside_the_allow_list_is_refused_naming_the_setting(s: Stores) -> None:
    task = Task(func="json:dumps", args=([1],))
    await s.submit(task)
    await s.worker(burst=True, allowed_modules=()).run()
    result = await result_of(s, task.id)
    assert result.status == TaskStatus.FAILED
    assert result.error_type == "omniq.errors.TaskRefused"
    message = result.error_message or ""
    assert "task_modules" in message
    assert "--task-modules 'json'" in message
    assert "OMNIQ_TASK_MODULES=json" in message
    assert result.traceback is None
    assert await s.kinds(task.id) == ["started", "failed"]


@with_stores
async def test_refused_task_is_not_retried(s: Stores) -> None:
    task = Task(func="json:dumps", args=([1],), max_retries=3)
    await s.submit(task)
    await s.worker(burst=True, allowed_modules=("myapp.*",)).run()
    result = await result_of(s, task.id)
    assert result.status == TaskStatus.FAILED and result.attempts == 1


@with_stores
async def test_allow_list_globs_and_examples(s: Stores) -> None:
    allowed = Task(func="json:dumps", args=([1],))
    example = Task(func="omniq.examples:add", args=(1, 1))
    await s.submit(allowed, example)
    await s.worker(burst=True, allowed_modules=("js*",)).run()
    assert (await result_of(s, allowed.id)).value == "[1]"
    assert (await result_of(s, example.id)).value == 2


def test_module_allowed_rules() -> None:
    assert module_allowed("anything.at:all", None)
    assert module_allowed("omniq.examples:add", ())
    assert not module_allowed("omniq.client:x", ())
    assert module_allowed("myapp.tasks.mail:send", ("myapp",))  # a name covers submodules
    assert module_allowed("myapp.tasks:send", ("myapp.*",))
    assert not module_allowed("myapplication:send", ("myapp",))
    assert module_allowed("whatever:f", ("*",))


@with_stores
async def test_shell_task_is_refused_without_allow_shell(s: Stores) -> None:
    task = Task(func=SHELL_FUNC, kind=TaskKind.SHELL, args=("echo", "hi"))
    await s.submit(task)
    await s.worker(burst=True).run()
    result = await result_of(s, task.id)
    assert result.status == TaskStatus.FAILED
    assert "--allow-shell" in (result.error_message or "")


@with_stores
async def test_shell_task_runs_with_allow_shell(s: Stores) -> None:
    ok = Task(func=SHELL_FUNC, kind=TaskKind.SHELL, args=("echo", "hi"))
    bad = Task(func=SHELL_FUNC, kind=TaskKind.SHELL, kwargs={"sh": "echo oops >&2; exit 3"})
    await s.submit(ok, bad)
    await s.worker(burst=True, allow_shell=True).run()
    good = await result_of(s, ok.id)
    assert good.status == TaskStatus.COMPLETED
    assert good.value == {"exit_code": 0, "stdout": "hi\n", "stderr": ""}
    failed = await result_of(s, bad.id)
    assert failed.status == TaskStatus.FAILED
    assert failed.value["exit_code"] == 3 and failed.value["stderr"] == "oops\n"
    assert "exited with code 3" in (failed.error_message or "")


@with_stores
async def test_expired_task_is_not_run_and_records_expired(s: Stores) -> None:
    task = Task(func="omniq.examples:add", args=(1, 1), expires_at=utcnow() - timedelta(seconds=1))
    await s.submit(task)
    await s.worker(burst=True).run()
    result = await result_of(s, task.id)
    assert result.status == TaskStatus.EXPIRED
    assert result.started_at is None
    assert await s.kinds(task.id) == ["expired"]


# --- stopping -------------------------------------------------------------------------------


@with_stores
async def test_graceful_stop_lets_running_tasks_finish(s: Stores) -> None:
    task = Task(func="omniq.examples:async_sleep", args=(0.3, "finished"))
    await s.submit(task)
    worker = s.worker(shutdown_timeout=10)
    running = asyncio.create_task(worker.run())
    await until(lambda: _has(s, task.id, "started"))
    worker.request_stop()
    assert await running == 1
    assert (await result_of(s, task.id)).value == "finished"


@with_stores
async def test_graceful_stop_releases_tasks_still_running_after_the_timeout(s: Stores) -> None:
    task = Task(func="omniq.examples:async_sleep", args=(30,))
    waiting = Task(func="omniq.examples:add", args=(1, 1), eta=utcnow() + timedelta(hours=1))
    await s.submit(task, waiting)
    worker = s.worker(shutdown_timeout=0.2)
    running = asyncio.create_task(worker.run())
    await until(lambda: _has(s, task.id, "started"))
    worker.request_stop()
    assert await running == 0
    assert await s.results.get(task.id) is None  # not failed, not lost
    again = await s.queue.dequeue(["default"], 5, 1)
    assert again is not None and again.task_id == task.id
    assert again.attempt == 1  # a release does not count as an attempt
    assert worker.running == {}
    assert await s.kinds(task.id) == ["started", "released"]  # it does not look stuck


@with_stores
async def test_forced_stop_releases_at_once(s: Stores) -> None:
    task = Task(func="omniq.examples:async_sleep", args=(30,))
    await s.submit(task)
    worker = s.worker(shutdown_timeout=60)
    running = asyncio.create_task(worker.run())
    await until(lambda: _has(s, task.id, "started"))
    worker.request_stop()
    await asyncio.sleep(0.1)
    assert not running.done()  # still draining
    worker.request_stop(force=True)
    assert await asyncio.wait_for(running, 5) == 0
    assert await s.queue.get_task(task.id) is not None
    assert await s.results.get(task.id) is None


@with_stores
async def test_stop_before_start_takes_nothing(s: Stores) -> None:
    task = Task(func="omniq.examples:add", args=(1, 1))
    await s.submit(task)
    worker = s.worker()
    worker.request_stop()
    assert await worker.run() == 0
    assert await s.results.get(task.id) is None


@with_stores
async def test_max_tasks_stops_after_that_many(s: Stores) -> None:
    tasks = [Task(func="omniq.examples:add", args=(i, 0)) for i in range(3)]
    await s.submit(*tasks)
    done = await s.worker(max_tasks=2, concurrency=4).run()
    assert done == 2
    stored = [await s.results.get(t.id) for t in tasks]
    assert sum(r is not None for r in stored) == 2
    stats = {q.queue: q for q in await s.queue.stats()}
    assert stats["default"].queued == 1 and stats["default"].running == 0


@with_stores
async def test_queues_are_consumed_in_the_order_given(s: Stores) -> None:
    low = Task(func="omniq.examples:add", args=(1, 1), queue="low")
    high = Task(func="omniq.examples:add", args=(2, 2), queue="high")
    await s.submit(low, high)
    await s.worker(burst=True, concurrency=1, queues=("high", "low")).run()
    first = (await s.events.get(high.id))[0].timestamp
    second = (await s.events.get(low.id))[0].timestamp
    assert first <= second


@with_stores
async def test_worker_registers_and_unregisters(s: Stores) -> None:
    worker = s.worker(register=True, heartbeat=0.05)
    running = asyncio.create_task(worker.run())
    await until(lambda: _registered(s, worker.worker_id))
    worker.request_stop()
    await running
    assert [w.worker_id for w in await s.queue.workers()] == []


async def _has(s: Stores, task_id: str, kind: str) -> bool:
    return kind in await s.kinds(task_id)


async def _registered(s: Stores, worker_id: str) -> bool:
    return worker_id in [w.worker_id for w in await s.queue.workers()]


# --- regressions ------------------------------------------------------------------------------


@with_stores
async def test_stop_is_seen_while_every_slot_is_busy(s: Stores) -> None:
    """With all slots taken, the fetch loop must still notice a stop and start the drain."""
    task = Task(func="omniq.examples:async_sleep", args=(30,))
    await s.submit(task)
    worker = s.worker(concurrency=1, shutdown_timeout=0.2)
    running = asyncio.create_task(worker.run())
    await until(lambda: _has(s, task.id, "started"))
    worker.request_stop()
    assert await asyncio.wait_for(running, 5) == 0
    assert await s.queue.get_task(task.id) is not None  # released
    assert await s.results.get(task.id) is None


@with_stores
async def test_max_tasks_lets_the_last_tasks_finish(s: Stores) -> None:
    """Reaching --max-tasks is not a shutdown: running tasks are not cut at shutdown_timeout."""
    task = Task(func="omniq.examples:async_sleep", args=(0.5, "done"))
    await s.submit(task)
    assert await s.worker(max_tasks=1, shutdown_timeout=0.05).run() == 1
    assert (await result_of(s, task.id)).value == "done"


class SlowResults(MemoryResultStorage):
    """The write lands at once, the reply is slow: a shutdown may hit in between."""

    async def store(self, result: TaskResult) -> bool:
        stored = await super().store(result)
        await asyncio.sleep(0.5)
        return stored


def test_shutdown_while_recording_an_outcome_does_not_run_the_task_again() -> None:
    """A drain must not hand back a task whose outcome is being written: it would run twice."""

    async def main() -> None:
        s = Stores(MemoryQueue(), SlowResults(), MemoryEventStorage())
        task = Task(func="omniq.examples:add", args=(1, 1))
        await s.submit(task)
        worker = s.worker(shutdown_timeout=0.1)
        running = asyncio.create_task(worker.run())
        await until(lambda: _stored(s, task.id))
        worker.request_stop()
        await running
        await s.worker(burst=True).run()  # a second worker must find nothing to run
        assert await s.kinds(task.id) == ["started", "completed"]
        assert await s.queue.get_task(task.id) is None

    run(main)


async def _count(s: Stores, task_id: str, kind: str, n: int) -> bool:
    return (await s.kinds(task_id)).count(kind) >= n


async def _stored(s: Stores, task_id: str) -> bool:
    return await s.results.get(task_id) is not None


# --- task context and progress -----------------------------------------------------------


def _progress_task(steps: int) -> dict[str, object]:
    from omniq import current_task

    task = current_task()
    for i in range(steps):
        task.progress(i + 1, steps, f"step {i + 1}")
    return {"id": task.task_id, "attempt": task.attempt, "queue": task.queue}


async def _async_progress_task(steps: int) -> str:
    from omniq import current_task

    task = current_task()
    for i in range(steps):
        task.progress(i + 1, steps)
        await asyncio.sleep(0.1)
    return task.task_id


@with_stores
async def test_a_sync_task_sees_itself_and_reports_progress(s: Stores) -> None:
    task = Task(func="local:p#1", args=(50,), queue="q")
    worker = Worker(s.queue, s.results, s.events, replace(FAST, burst=True, queues=("q",)),
                    local_functions={"local:p#1": _progress_task})
    await s.submit(task)
    await worker.run()
    result = await result_of(s, task.id)
    assert result.value == {"id": task.id, "attempt": 1, "queue": "q"}
    events = await s.events.get(task.id)
    progress = [e for e in events if e.event_type == EventType.PROGRESS]
    # 50 reports in a moment: rate-limited, and the last one is always written.
    assert 1 <= len(progress) <= 3
    assert progress[-1].details == {"done": 50, "total": 50, "message": "step 50"}
    assert [e.event_type.value for e in events][-1] == "completed"


@with_stores
async def test_an_async_task_reports_progress_over_time(s: Stores) -> None:
    task = Task(func="local:a#1", args=(8,))
    worker = Worker(s.queue, s.results, s.events, replace(FAST, burst=True),
                    local_functions={"local:a#1": _async_progress_task})
    await s.submit(task)
    await worker.run()
    assert (await result_of(s, task.id)).value == task.id
    done = [e.details["done"] for e in await s.events.get(task.id)
            if e.event_type == EventType.PROGRESS]
    assert 3 <= len(done) <= 8 and done == sorted(done) and done[-1] == 8


def test_current_task_outside_a_task_says_so() -> None:
    from omniq import current_task
    from omniq.errors import OmniQError

    with pytest.raises(OmniQError, match="only available inside a running task"):
        current_task()


@with_stores
async def test_a_shell_tasks_output_streams_as_events_and_keeps_its_tail(s: Stores) -> None:
    script = "for i in $(seq 1 6); do echo line $i; sleep 0.2; done; echo oops >&2"
    task = Task(func=SHELL_FUNC, kwargs={"sh": script}, kind=TaskKind.SHELL)
    await s.submit(task)
    await s.worker(burst=True, allow_shell=True, shell_output_limit=20).run()
    events = await s.events.get(task.id)
    live = [e for e in events if e.event_type == EventType.OUTPUT]
    assert len(live) >= 2  # while it ran, not all at the end
    assert events.index(live[0]) < [e.event_type for e in events].index(EventType.COMPLETED)
    stdout = "".join(e.details["text"] for e in live if e.details["stream"] == "stdout")
    assert stdout.startswith("line 1\nline 2\n") and "live output stops here" in stdout
    result = await result_of(s, task.id)
    assert result.value["stdout"].endswith("line 5\nline 6\n")  # the tail is kept
    assert result.value["stdout"].startswith("[... ")
    assert result.value["stderr"] == "oops\n"
