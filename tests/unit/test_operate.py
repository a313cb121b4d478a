"""Operator features through the API on memory stores: dependencies, chains, cancelling a
running task, failed tasks in bulk, schedules (issue 11)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from omniq import OmniQ, current_task
from omniq.client import AsyncOmniQ
from omniq.config import OmniQConfig
from omniq.errors import TaskFailed, TaskStateError
from omniq.operate import BEFORE, FINISHED, WHILE_RUNNING, ScheduleNotFound
from omniq.schedules import Schedule


def memory_config(**values: object) -> OmniQConfig:
    return OmniQConfig.from_values(
        task_queue_type="memory", result_storage_type="memory", event_storage_type="memory",
        default_retry_delay=0.01, **values,
    )


@pytest.fixture
def omniq() -> Iterator[OmniQ]:
    with OmniQ(memory_config(), embedded_worker="shared") as client:
        yield client


def kinds(client: OmniQ, task_id: str) -> list[str]:
    return [e.event_type.value for e in client.get_events(task_id)]


# --- dependencies ---------------------------------------------------------------------------


def test_a_task_waits_for_the_tasks_it_depends_on(omniq: OmniQ) -> None:
    slow = omniq.enqueue("omniq.examples:sleep", 0.5, "first")
    after = omniq.options(after=[slow]).enqueue("omniq.examples:echo", "second")
    assert omniq.get_result(after, timeout=10) == {"args": ["second"], "kwargs": {}}
    first_done = omniq.wait_result(slow, timeout=0).finished_at
    assert omniq.wait_result(after, timeout=0).started_at >= first_done
    assert kinds(omniq, after) == ["enqueued", "started", "completed"]  # no noise


def test_a_dependency_done_before_the_dependent_is_enqueued(omniq: OmniQ) -> None:
    done = omniq.enqueue("omniq.examples:add", 1, 1)
    assert omniq.get_result(done, timeout=10) == 2
    later = omniq.options(after=[done], pass_result=True).enqueue("omniq.examples:add", 40)
    assert omniq.get_result(later, timeout=10) == 42  # 2 + 40


def test_a_failed_dependency_fails_the_dependent_saying_which(omniq: OmniQ) -> None:
    bad = omniq.enqueue("omniq.examples:fail")
    after = omniq.options(after=[bad]).enqueue("omniq.examples:add", 1, 1)
    with pytest.raises(TaskFailed, match=f"dependency failed: task {bad} ended failed") as info:
        omniq.get_result(after, timeout=10)
    assert info.value.error_type == "omniq.errors.DependencyFailed"
    assert kinds(omniq, after) == ["enqueued", "failed"]  # never started


def test_a_dependency_that_never_completes_keeps_the_dependent_waiting(omniq: OmniQ) -> None:
    never = omniq.options(delay=3600).enqueue("omniq.examples:add", 1, 1)
    waiting = omniq.options(after=[never]).enqueue("omniq.examples:add", 2, 2)
    time.sleep(1.2)
    assert omniq.get_events(waiting)[-1].event_type.value == "enqueued"
    stats = {s.queue: s for s in omniq.stats()}
    assert stats["default"].scheduled == 2 and stats["default"].failed == 0


def test_a_chain_passes_results_along(omniq: OmniQ) -> None:
    ids = omniq.chain(("omniq.examples:add", (1, 2)), ("omniq.examples:add", (10,)),
                      ("omniq.examples:add", (100,)), pass_results=True)
    assert omniq.get_result(ids[-1], timeout=10) == 113


# --- cancelling a running task --------------------------------------------------------------


async def _forever() -> None:
    await asyncio.sleep(3600)


def _cooperative(stop: threading.Event) -> object:
    def run() -> str:
        task = current_task()
        for _ in range(300):
            if task.cancelled:
                stop.set()
                task.raise_if_cancelled()
            time.sleep(0.05)
        return "never cancelled"

    return run


def test_cancel_a_running_async_task(omniq: OmniQ) -> None:
    task_id = omniq.enqueue(_forever)
    _wait_for(omniq, task_id, "started")
    assert omniq.cancel_task(task_id) == WHILE_RUNNING
    result = omniq.wait_result(task_id, timeout=5)
    assert result.status.value == "cancelled"
    assert kinds(omniq, task_id) == ["enqueued", "started", "cancelled"]
    assert omniq.cancel_task(task_id) == FINISHED


def test_cancel_a_running_sync_task_that_checks(omniq: OmniQ) -> None:
    stop = threading.Event()
    task_id = omniq.enqueue(_cooperative(stop))  # a closure: it runs in this process
    _wait_for(omniq, task_id, "started")
    assert omniq.cancel(task_id) is True
    assert stop.is_set()
    assert omniq.wait_result(task_id, timeout=5).status.value == "cancelled"


def test_cancel_before_it_ran() -> None:
    client = OmniQ(memory_config())
    try:
        task_id = client.enqueue("omniq.examples:add", 1, 1)
        assert client.cancel_task(task_id) == BEFORE
        assert kinds(client, task_id) == ["enqueued", "cancelled"]
    finally:
        client.close()


def _wait_for(client: OmniQ, task_id: str, kind: str) -> None:
    deadline = time.monotonic() + 10
    while kind not in kinds(client, task_id):
        assert time.monotonic() < deadline, kinds(client, task_id)
        time.sleep(0.02)


# --- failed tasks ---------------------------------------------------------------------------


def test_failed_tasks_listed_retried_and_purged_in_bulk() -> None:
    with OmniQ(memory_config(worker_queues=["default", "mail"]),
               embedded_worker="shared") as omniq:
        _failed_in_bulk(omniq)


def _failed_in_bulk(omniq: OmniQ) -> None:
    ids = [omniq.options(queue=q).enqueue("omniq.examples:fail", f"boom {i}")
           for i, q in enumerate(["default", "default", "mail"])]
    ok = omniq.enqueue("omniq.examples:add", 1, 1)
    for task_id in ids:
        with pytest.raises(TaskFailed):
            omniq.get_result(task_id, timeout=10)
    assert omniq.get_result(ok, timeout=10) == 2
    listed = omniq.failed()  # newest failure first (they ran side by side: any order)
    assert sorted(f.task.id for f in listed) == sorted(ids)
    assert [f.failed_at for f in listed] == sorted((f.failed_at for f in listed), reverse=True)
    boom = {f.task.id: f.error for f in listed}
    assert boom[ids[2]] == "RuntimeError: boom 2" and all(f.result for f in listed)
    assert [f.task.id for f in omniq.failed(queue="mail")] == [ids[2]]
    assert omniq.failed(func="add") == [] and len(omniq.failed(func="fai*")) == 3
    dry = omniq.retry_failed(queue="default", dry_run=True)
    assert dry == [f.task.id for f in listed if f.task.id in ids[:2]]
    assert len(omniq.failed()) == 3  # a dry run changes nothing
    assert sorted(omniq.retry_failed(queue="default")) == sorted(ids[:2])
    for task_id in ids[:2]:
        with pytest.raises(TaskFailed):
            omniq.get_result(task_id, timeout=10)  # ran again, failed again
    assert omniq.purge_failed(queue="mail") == [ids[2]]
    assert sorted(f.task.id for f in omniq.failed()) == sorted(ids[:2])


# --- schedules ------------------------------------------------------------------------------


def test_each_slot_is_enqueued_once_however_many_fire_it() -> None:
    async def main() -> None:
        client = AsyncOmniQ(memory_config())
        await client.open()
        start = datetime.now(UTC) - timedelta(seconds=10)
        await client.add_schedule(Schedule(name="tick", func="omniq.examples:add",
                                           args=(1, 1), every=5, created_at=start))
        now = datetime.now(UTC)
        fired = await asyncio.gather(*(client.fire_schedules(now) for _ in range(5)))
        assert sum(len(f) for f in fired) == 1  # the latest missed slot, once
        assert await client.fire_schedules(now) == []
        (s,) = await client.schedules()
        assert s.last_slot is not None and s.last_slot <= now
        (task_id,) = [t for f in fired for t in f]
        (event,) = await client.get_events(task_id)
        assert event.details["schedule"] == "tick" and event.details["slot"]
        assert (await client.queue.get_task(task_id)).schedule == "tick"  # type: ignore[union-attr]
        await client.close()

    asyncio.run(main())


def test_pause_resume_remove_and_run_now() -> None:
    async def main() -> None:
        client = AsyncOmniQ(memory_config())
        await client.open()
        start = datetime.now(UTC) - timedelta(minutes=2)
        await client.add_schedule(Schedule(name="m", func="omniq.examples:add", args=(2, 2),
                                           cron="* * * * *", created_at=start))
        with pytest.raises(TaskStateError):
            await client.add_schedule(Schedule(name="m", func="x:y", every=5))
        await client.pause_schedule("m")
        assert await client.fire_schedules() == []
        await client.resume_schedule("m")
        assert await client.fire_schedules() == []  # the pause's slots are not caught up
        later = datetime.now(UTC) + timedelta(minutes=1, seconds=1)
        assert len(await client.fire_schedules(later)) == 1  # the next slot runs
        now_id = await client.run_schedule_now("m")
        assert (await client.queue.get_task(now_id)).slot is None  # type: ignore[union-attr]
        await client.remove_schedule("m")
        with pytest.raises(ScheduleNotFound):
            await client.get_schedule("m")
        await client.close()

    asyncio.run(main())


def test_schedules_declared_in_the_configuration() -> None:
    config = memory_config(schedules=[
        {"name": "beat", "func": "omniq.examples:add", "args": [1, 2], "every": "30s",
         "retries": 2, "catch_up": "none"},
    ])

    async def main() -> None:
        client = AsyncOmniQ(config)
        await client.open()
        (s,) = await client.schedules()
        assert (s.name, s.every, s.options, s.source) == ("beat", 30.0, {"retries": 2}, "config")
        with pytest.raises(TaskStateError, match="declared in the configuration"):
            await client.remove_schedule("beat")
        await client.pause_schedule("beat")  # a pause is kept beside the file's definition
        assert (await client.get_schedule("beat")).paused is True
        await client.close()

    asyncio.run(main())


def _ghost_holds_the_slot(client: AsyncOmniQ, schedule: Schedule, now: datetime) -> str:
    """The slot's key held by a task that never appeared: a firing worker killed between
    the key and the task (memory stores cannot die half-way; the file queue can)."""
    import uuid

    ghost = str(uuid.uuid4())
    slot = schedule.due(now)[-1]
    held = (ghost, time.time() + 3600)  # memory frees an unfinished holder it does not know
    client.queue._unique[schedule.slot_key(slot)] = held  # type: ignore[union-attr]
    return ghost


def test_a_slot_held_by_a_task_that_never_appeared_is_fired_again_later(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from omniq import operate

    async def main() -> None:
        client = AsyncOmniQ(memory_config())
        await client.open()
        start = datetime.now(UTC) - timedelta(seconds=10)
        tick = Schedule(name="tick", func="omniq.examples:add", args=(1, 1), every=5,
                        created_at=start)
        await client.add_schedule(tick)
        now = datetime.now(UTC)
        ghost = _ghost_holds_the_slot(client, tick, now)
        assert await client.fire_schedules(now) == []
        (s,) = await client.schedules()
        assert s.last_slot is None, "a slot nobody enqueued was noted as fired"
        client.queue._unique.clear()  # type: ignore[union-attr]  # the queue freed the key
        assert len(await client.fire_schedules(now)) == 1
        # A key that stays held by a ghost is given up after HALF_FIRED_GIVE_UP, loudly.
        later = now + timedelta(seconds=5)
        ghost = _ghost_holds_the_slot(client, tick, later)
        monkeypatch.setattr(operate, "HALF_FIRED_GIVE_UP", 0.0)
        assert await client.fire_schedules(later) == []
        (s,) = await client.schedules()
        assert s.last_slot == tick.due(later)[-1]
        assert ghost in caplog.text and "given up" in caplog.text
        await client.close()

    asyncio.run(main())
