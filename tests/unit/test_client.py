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
    OmniQError,
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


def test_options_route_to_queue() -> None:
    client = OmniQ(memory_config())  # no embedded worker: the task waits on its queue
    try:
        task_id = client.options(queue="other").enqueue("omniq.examples:add", 1, 2)
        assert client.get_events(task_id)[0].queue == "other"
        stats = {s.queue: s for s in client.stats()}
        assert stats["other"].queued == 1
    finally:
        client.close()


def test_the_embedded_worker_runs_own_tasks_whatever_their_queue(omniq: OmniQ) -> None:
    """The README's example: options(queue="mail") inside `with OmniQ()`."""

    def send_mail(to: str) -> str:
        return f"sent to {to}"

    mail = omniq.options(queue="mail", retries=3).enqueue(send_mail, "bob@example.com")
    other = omniq.options(queue="other").enqueue("omniq.examples:add", 1, 2)
    assert omniq.get_result(mail, timeout=10) == "sent to bob@example.com"
    assert omniq.get_result(other, timeout=10) == 3
    assert omniq.get_events(other)[0].queue == "other"


def shared_config(tmp_path: Path, **values: object) -> OmniQConfig:
    """Stores other processes share (SQLite under tmp_path)."""
    return OmniQConfig.from_values(home=str(tmp_path), **values)


def test_with_omniq_never_runs_what_others_put_on_a_shared_queue(tmp_path: Path) -> None:
    """A producer script must not become an unrestricted worker (issue: os:getcwd ran)."""
    other = OmniQ(shared_config(tmp_path))
    foreign = other.enqueue("os:getcwd")  # as `omniq enqueue os:getcwd --no-check` would
    other.close()
    with OmniQ(shared_config(tmp_path)) as producer:
        own = producer.enqueue("omniq.examples:add", 2, 2)
        assert producer.get_result(own, timeout=10) == 4
        time.sleep(1.0)  # time enough for a worker on the shared queue to take it
        with pytest.raises(ResultTimeout):
            producer.wait_result(foreign, timeout=0)
    after = OmniQ(shared_config(tmp_path))
    assert [s.queued for s in after.stats()] == [1]  # still there, for a daemon
    assert kinds(after, foreign) == ["enqueued"]
    after.close()


def test_shared_mode_works_the_shared_queue_with_the_allow_list(tmp_path: Path) -> None:
    other = OmniQ(shared_config(tmp_path))
    allowed = other.enqueue("omniq.examples:add", 1, 1)
    foreign = other.enqueue("os:getcwd")
    other.close()
    with OmniQ(shared_config(tmp_path), embedded_worker="shared") as client:
        assert client.get_result(allowed, timeout=10) == 2
        with pytest.raises(TaskFailed, match="not allowed by task_modules"):
            client.get_result(foreign, timeout=10)


def test_an_explicit_worker_runs_the_modules_this_client_enqueued_from(tmp_path: Path) -> None:
    async def main() -> None:
        producer = AsyncOmniQ(shared_config(tmp_path))
        await producer.open()
        mine = await producer.options(queue="mail").enqueue("json:dumps", [1])
        foreign = await producer.options(queue="mail").enqueue("os:getcwd")
        producer._enqueued_modules.discard("os")  # as if another process had queued it
        await producer.start_worker(queues=("mail",))
        assert await producer.get_result(mine, timeout=10) == "[1]"
        with pytest.raises(TaskFailed, match="not allowed"):
            await producer.get_result(foreign, timeout=10)
        await producer.close()

    asyncio.run(main())


def test_task_modules_bind_the_embedded_worker_too(tmp_path: Path) -> None:
    with OmniQ(shared_config(tmp_path, task_modules=["myapp"])) as client:
        with pytest.raises(TaskFailed, match="not allowed by task_modules"):
            client.get_result(client.enqueue("json:dumps", [1]), timeout=10)
        assert client.get_result(client.enqueue(lambda: "local"), timeout=10) == "local"


def test_start_worker_honours_its_arguments() -> None:
    async def main() -> None:
        async with AsyncOmniQ(memory_config(), embedded_worker="off") as client:
            task_id = await client.options(queue="mail").enqueue("omniq.examples:add", 1, 2)
            default = await client.start_worker()
            mail = await client.start_worker(queues=("mail",))
            assert default.settings.queues == ("default",) and mail.settings.queues == ("mail",)
            assert await client.get_result(task_id, timeout=10) == 3

    asyncio.run(main())


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


def test_retry_of_failed_task(omniq: OmniQ, tmp_path: Path) -> None:
    marker = tmp_path / "count"
    task_id = omniq.enqueue("omniq.examples:flaky", str(marker), 1)
    with pytest.raises(TaskFailed):
        omniq.get_result(task_id, timeout=10)
    assert omniq.retry(task_id) == task_id  # the same task runs again
    assert omniq.get_result(task_id, timeout=10) == 2
    assert kinds(omniq, task_id) == [
        "enqueued", "started", "failed", "enqueued", "started", "completed"
    ]
    assert omniq.get_events(task_id)[3].details.get("retry") is True


def test_retry_twice_queues_one_run(tmp_path: Path) -> None:
    config = shared_config(tmp_path)
    client = OmniQ(config)
    task_id = client.enqueue("omniq.examples:fail")
    with OmniQ(config, embedded_worker="shared") as worker, pytest.raises(TaskFailed):
        worker.get_result(task_id, timeout=10)
    assert client.retry(task_id) == task_id
    assert client.retry(task_id) == task_id  # already queued again: nothing more
    stats = {s.queue: s for s in client.stats()}
    assert (stats["default"].queued, stats["default"].failed) == (1, 0)
    assert kinds(client, task_id).count("enqueued") == 2
    client.close()


@pytest.mark.parametrize("bad", ["abc\x00def", "", "a b", "../etc/passwd", "x" * 300])
def test_an_id_no_store_can_hold_is_not_found(omniq: OmniQ, bad: str) -> None:
    with pytest.raises(TaskNotFound):
        omniq.get_result(bad, timeout=0)
    assert omniq.get_events(bad) == []
    assert omniq.cancel(bad) is False
    with pytest.raises(TaskNotFound):
        omniq.retry(bad)


def test_retry_refuses_a_task_that_did_not_fail(omniq: OmniQ) -> None:
    task_id = omniq.enqueue("omniq.examples:add", 1, 1)
    assert omniq.get_result(task_id, timeout=10) == 2
    with pytest.raises(OmniQError, match="has not failed"):
        omniq.retry(task_id)


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


def test_sync_enqueue_on_sqlite_skips_the_loop_and_keeps_its_guarantees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the stores are open, the sync API writes a task on SQLite through the store
    thread alone (two thread hops instead of four: ~310 -> ~230 us per enqueue measured),
    with what `submit` guarantees: the ENQUEUED event, a held key's holder, the errors."""
    from omniq import client as client_module

    config = OmniQConfig.from_values(home=str(tmp_path), embedded_worker="off")
    with OmniQ(config) as q:
        first = q.enqueue("omniq.examples:add", 1, 2)  # opens the stores (through the loop)
        trips: list[object] = []
        real = client_module._LoopThread.call
        monkeypatch.setattr(client_module._LoopThread, "call",
                            lambda self, coro: trips.append(coro) or real(self, coro))
        task_id = q.enqueue("omniq.examples:add", 2, 3)
        keyed = q.options(unique_key="k").enqueue("omniq.examples:add", 3, 4)
        again = q.options(unique_key="k").enqueue("omniq.examples:add", 5, 6)
        assert trips == [], "a sync enqueue went through the event loop"
        assert again == keyed != task_id != first
        assert [e.event_type for e in q.get_events(task_id)] == [EventType.ENQUEUED]
        with pytest.raises(SerializationError):
            q.enqueue("omniq.examples:add", object())
        local = q.enqueue(lambda: 7)  # runs in this process: through the loop as before
        assert q.get_result(local, timeout=10) == 7


def test_local_functions_enqueued_from_many_threads_each_run_their_own(omniq: OmniQ) -> None:
    """The sync API builds tasks on its callers' threads: two lambdas registered at once
    must not share a token (one would run the other's code)."""
    import threading

    omniq.enqueue(lambda: 0)  # the loop thread exists: later calls build here
    ids: dict[int, str] = {}

    def enqueue_some(base: int) -> None:
        for i in range(base, base + 40):
            ids[i] = omniq.enqueue(lambda i=i: i)

    threads = [threading.Thread(target=enqueue_some, args=(40 * n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {i: omniq.get_result(t, timeout=30) for i, t in ids.items()} == {i: i for i in ids}
