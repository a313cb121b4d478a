"""The Python API (OmniQ / AsyncOmniQ) on in-memory stores."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from omniq import AsyncOmniQ, OmniQ
from omniq.config import OmniQConfig
from omniq.errors import (
    ResultTimeout,
    SerializationError,
    TaskCancelled,
    TaskExpired,
    TaskFailed,
    TaskNotFound,
    TaskTimeout,
)
from omniq.models import EventFilter, EventType, TaskStatus


def memory_config(**values: object) -> OmniQConfig:
    return OmniQConfig.from_values(
        task_queue_type="memory", result_storage_type="memory", event_storage_type="memory",
        **values,
    )


@pytest.fixture
def omniq() -> Iterator[OmniQ]:
    with OmniQ(memory_config(default_retry_delay=0.01)) as client:
        yield client


def kinds(client: OmniQ, task_id: str) -> list[str]:
    return [e.event_type.value for e in client.get_events(task_id)]


def test_import_path_function_runs_in_embedded_worker(omniq: OmniQ) -> None:
    task_id = omniq.enqueue("omniq.examples:add", 2, 3)
    assert omniq.get_result(task_id, timeout=10) == 5
    assert kinds(omniq, task_id) == ["enqueued", "started", "completed"]


def test_callable_object_is_sent_by_import_path(omniq: OmniQ) -> None:
    from omniq.examples import add

    task_id = omniq.enqueue(add, 1, 1)
    assert omniq.get_result(task_id, timeout=10) == 2
    assert omniq.get_events(task_id)[0].details["func"] == "omniq.examples:add"


def test_lambda_runs_without_context_manager() -> None:
    client = OmniQ(memory_config())
    try:
        task_id = client.enqueue(lambda: "hello")
        assert client.get_result(task_id) == "hello"
        assert client.get_events(task_id)[0].details["func"].startswith("local:")
    finally:
        client.close()


def test_closure_runs_locally(omniq: OmniQ) -> None:
    factor = 7

    def times(x: int) -> int:
        return x * factor

    assert omniq.get_result(omniq.enqueue(times, 6), timeout=10) == 42


def test_failure_raises_with_remote_traceback(omniq: OmniQ) -> None:
    task_id = omniq.enqueue("omniq.examples:fail", "boom")
    with pytest.raises(TaskFailed) as info:
        omniq.get_result(task_id, timeout=10)
    assert info.value.error_type == "RuntimeError"
    assert info.value.message == "boom"
    assert "raise RuntimeError(message)" in (info.value.remote_traceback or "")
    assert kinds(omniq, task_id) == ["enqueued", "started", "failed"]


def test_unknown_id_is_not_found_instead_of_waiting(omniq: OmniQ) -> None:
    with pytest.raises(TaskNotFound):
        omniq.get_result("01a2202b-13f5-7000-887b-6b8a5bcac977")


def test_timeout_zero_on_pending_task(omniq: OmniQ) -> None:
    task_id = omniq.options(delay=30).enqueue("omniq.examples:add", 1, 2)
    with pytest.raises(ResultTimeout):
        omniq.get_result(task_id, timeout=0)
    with pytest.raises(ResultTimeout):
        omniq.get_result(task_id, timeout=0.2)


def test_options_do_not_steal_task_keywords(omniq: OmniQ) -> None:
    task_id = omniq.enqueue("omniq.examples:echo", queue="q", delay=5, priority=1)
    assert omniq.get_result(task_id, timeout=10) == {
        "args": [], "kwargs": {"queue": "q", "delay": 5, "priority": 1},
    }


def test_options_route_to_queue(omniq: OmniQ) -> None:
    task_id = omniq.options(queue="other").enqueue("omniq.examples:add", 1, 2)
    assert omniq.get_events(task_id)[0].queue == "other"
    stats = {s.queue: s for s in omniq.stats()}
    assert stats["other"].queued == 1  # the embedded worker consumes "default" only


def test_non_json_argument_is_refused_at_enqueue(omniq: OmniQ) -> None:
    with pytest.raises(SerializationError, match="argument 'when'"):
        omniq.enqueue("omniq.examples:echo", when=object())
    with pytest.raises(SerializationError, match="argument 1"):
        omniq.enqueue("omniq.examples:echo", 1, {1, 2})


def test_unique_key_returns_first_id(omniq: OmniQ) -> None:
    bound = omniq.options(unique_key="nightly", delay=30)
    first = bound.enqueue("omniq.examples:add", 1, 2)
    assert bound.enqueue("omniq.examples:add", 1, 2) == first
    assert kinds(omniq, first) == ["enqueued"]


def test_cancel_delayed_task(omniq: OmniQ) -> None:
    task_id = omniq.options(delay=30).enqueue("omniq.examples:add", 1, 2)
    assert omniq.cancel(task_id) is True
    with pytest.raises(TaskCancelled):
        omniq.get_result(task_id, timeout=1)
    assert kinds(omniq, task_id) == ["enqueued", "cancelled"]
    assert omniq.cancel(task_id) is False


def test_retries_then_success(omniq: OmniQ, tmp_path: Path) -> None:
    marker = str(tmp_path / "count")
    task_id = omniq.options(retries=2).enqueue("omniq.examples:flaky", marker, failures=2)
    assert omniq.get_result(task_id, timeout=20) == 3
    events = omniq.get_events(task_id)
    assert [e.event_type.value for e in events] == [
        "enqueued", "started", "retried", "started", "retried", "started", "completed",
    ]
    assert [e.attempt for e in events if e.event_type == EventType.STARTED] == [1, 2, 3]
    result = omniq.wait_result(task_id)
    assert result.attempts == 3


def test_retries_exhausted_fail(omniq: OmniQ, tmp_path: Path) -> None:
    marker = str(tmp_path / "count")
    task_id = omniq.options(retries=1).enqueue("omniq.examples:flaky", marker, failures=5)
    with pytest.raises(TaskFailed, match="flaky failure 2 of 5"):
        omniq.get_result(task_id, timeout=20)


def test_timeout_outcome(omniq: OmniQ) -> None:
    task_id = omniq.options(timeout=0.2).enqueue("omniq.examples:async_sleep", 5)
    with pytest.raises(TaskTimeout):
        omniq.get_result(task_id, timeout=10)
    assert kinds(omniq, task_id)[-1] == "timeout"


def test_expired_before_start() -> None:
    async def main() -> list[str]:
        client = AsyncOmniQ(memory_config())
        await client.open()
        task_id = await client.options(ttl=0.05).enqueue("omniq.examples:add", 1, 2)
        await asyncio.sleep(0.2)  # nobody works the queue before the TTL passes
        await client.start_worker()
        with pytest.raises(TaskExpired):
            await client.get_result(task_id, timeout=10)
        events = [e.event_type.value for e in await client.get_events(task_id)]
        await client.close()
        return events

    assert asyncio.run(main()) == ["enqueued", "expired"]


def test_enqueue_many(omniq: OmniQ) -> None:
    ids = omniq.enqueue_many([("omniq.examples:add", (i, i)) for i in range(20)])
    assert [omniq.get_result(t, timeout=10) for t in ids] == [2 * i for i in range(20)]


def test_retry_of_failed_task(omniq: OmniQ) -> None:
    task_id = omniq.enqueue("omniq.examples:fail", "once")
    with pytest.raises(TaskFailed):
        omniq.get_result(task_id, timeout=10)
    new_id = omniq.retry(task_id)
    assert new_id != task_id
    with pytest.raises(TaskFailed):
        omniq.get_result(new_id, timeout=10)


def test_follow_events_live(omniq: OmniQ) -> None:
    follow = omniq.follow_events(filters=EventFilter(event_types=frozenset({EventType.COMPLETED})))
    task_id = omniq.enqueue("omniq.examples:add", 4, 4)
    event = next(follow)
    assert event.task_id == task_id and event.event_type == EventType.COMPLETED
    follow.close()


def test_wait_result_record(omniq: OmniQ) -> None:
    task_id = omniq.enqueue("omniq.examples:add", 1, 2)
    result = omniq.wait_result(task_id, timeout=10)
    assert result.status == TaskStatus.COMPLETED and result.value == 3
    assert result.worker_id and result.started_at and result.enqueued_at


def test_sync_api_from_inside_a_running_event_loop() -> None:
    async def main() -> int:
        with OmniQ(memory_config()) as client:
            return int(client.get_result(client.enqueue("omniq.examples:add", 1, 1), timeout=10))

    assert asyncio.run(main()) == 2


def test_async_api() -> None:
    async def main() -> object:
        async with AsyncOmniQ(memory_config()) as client:
            task_id = await client.enqueue(lambda x: x + 1, 41)
            return await client.get_result(task_id, timeout=10)

    assert asyncio.run(main()) == 42


def test_context_exit_drains_local_tasks() -> None:
    ran: list[str] = []

    def slow() -> None:
        time.sleep(0.05)
        ran.append("done")

    with OmniQ(memory_config(worker_concurrency=1)) as client:
        for _ in range(5):  # nobody waits for them, and most are still queued: the exit must
            client.enqueue(slow)
        core = client.core
    assert ran == ["done"] * 5
    assert not core.is_open


def test_invalid_queue_name() -> None:
    with OmniQ(memory_config()) as client, pytest.raises(ValueError, match="invalid queue name"):
        client.options(queue="bad name!").enqueue("omniq.examples:add", 1, 2)


def test_timed_out_sync_task_does_not_starve_later_tasks() -> None:
    # One slot: the timed-out thread keeps sleeping, yet the next task must run.
    with OmniQ(memory_config(worker_concurrency=1)) as client:
        stuck = client.options(timeout=0.2).enqueue("omniq.examples:sleep", 8)
        with pytest.raises(TaskTimeout):
            client.get_result(stuck, timeout=6)
        assert client.get_result(client.enqueue("omniq.examples:add", 1, 2), timeout=6) == 3
        client.close(drain=False)


def test_no_false_lost_lease_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Heartbeats race with acks on a store with real I/O: a task acked while its
    # lease was being extended was reported as "lost" before.
    config = OmniQConfig.from_values(home=str(tmp_path), worker_heartbeat_seconds=0.002,
                                     worker_concurrency=8)
    with caplog.at_level("WARNING", logger="omniq.worker"), OmniQ(config) as client:
        ids = client.enqueue_many([("omniq.examples:add", (i, 1)) for i in range(300)])
        assert [client.get_result(t, timeout=30) for t in ids] == [i + 1 for i in range(300)]
    assert not [r for r in caplog.records if "lost the lease" in r.getMessage()]


def test_follow_from_now_means_the_call_not_the_first_next(omniq: OmniQ) -> None:
    # The task may finish before the caller first asks for an event.
    follow = omniq.follow_events(filters=EventFilter(event_types=frozenset({EventType.COMPLETED})))
    task_id = omniq.enqueue("omniq.examples:add", 4, 4)
    assert omniq.get_result(task_id, timeout=10) == 8
    event = next(follow)
    assert event.task_id == task_id
    follow.close()
