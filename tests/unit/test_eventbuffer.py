"""event_policy: buffer: events held while the event store is away, written back in order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from omniq.backends.memory import MemoryEventStorage
from omniq.errors import BackendError, BackendUnavailable
from omniq.eventbuffer import BufferedEventStorage
from omniq.models import EventType, TaskEvent, new_task_id


class Flaky(MemoryEventStorage):
    """An event store that can be switched off (unreachable) or made to refuse writes."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.refuse = False
        self.calls = 0

    async def append_many(self, events: Sequence[TaskEvent]) -> None:
        self.calls += 1
        await asyncio.sleep(0)
        if self.down:
            raise BackendUnavailable("event store down")
        if self.refuse:
            raise BackendError("value too long")
        await super().append_many(events)


def events(n: int, task_id: str | None = None) -> list[TaskEvent]:
    tid = task_id or new_task_id()
    return [TaskEvent(tid, EventType.STARTED, attempt=i) for i in range(n)]


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


async def until(check: Callable[[], bool], limit: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def stored(store: MemoryEventStorage) -> list[TaskEvent]:
    return [e for _, e in await store.read(None, 100_000)]


def test_writes_go_straight_through_while_the_store_answers(tmp_path: Path) -> None:
    async def body() -> None:
        inner = Flaky()
        buf = BufferedEventStorage(inner, tmp_path)
        batch = events(3)
        await buf.append_many(batch)
        assert await stored(inner) == batch and buf.held == 0
        assert not list(tmp_path.iterdir())

    run(body)


def test_an_outage_holds_events_and_writes_them_back_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        inner = Flaky()
        buf = BufferedEventStorage(inner, tmp_path, memory_limit=5)
        first = events(2)
        await buf.append_many(first)
        inner.down = True
        held = events(4)
        for e in held:  # returns at once: the work goes on
            await asyncio.wait_for(buf.append(e), 1)
        more = events(6)  # past the memory bound: these spill to disk
        await buf.append_many(more)
        assert buf.held == 10 and buf.dropped == 0
        assert list(tmp_path.glob("*.jsonl"))
        await asyncio.sleep(0.3)
        inner.down = False
        await until(lambda: buf.held == 0)
        assert await stored(inner) == first + held + more
        await buf.close()
        assert not list(tmp_path.glob("*.jsonl"))  # nothing left behind

    with caplog.at_level(logging.WARNING, "omniq.events"):
        run(body)
    text = caplog.text
    assert text.count("event store unavailable") == 1
    assert text.count("event store reachable again") == 1


def test_events_beyond_the_spill_bound_are_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        inner = Flaky()
        inner.down = True
        buf = BufferedEventStorage(inner, tmp_path, memory_limit=10, spill_limit=2000)
        for _ in range(100):
            await buf.append_many(events(5))
        assert 0 < buf.dropped < 500
        assert buf.held + buf.dropped == 500
        spill = next(tmp_path.glob("*.jsonl"))
        assert spill.stat().st_size < 2000 + 5 * 400  # bounded (to one batch past it)
        inner.down = False
        await until(lambda: buf.held == 0)
        assert len(await stored(inner)) == 500 - buf.dropped
        await buf.close()

    with caplog.at_level(logging.ERROR, "omniq.events"):
        run(body)
    assert "dropping events: the event buffer is full" in caplog.text


def test_a_refused_write_is_dropped_not_raised(tmp_path: Path) -> None:
    async def body() -> None:
        inner = Flaky()
        inner.refuse = True
        buf = BufferedEventStorage(inner, tmp_path)
        await buf.append_many(events(2))
        assert (buf.dropped, buf.held) == (2, 0)

    run(body)


def test_held_events_outlive_the_process_and_a_worker_writes_them(tmp_path: Path) -> None:
    async def body() -> None:
        inner = Flaky()
        inner.down = True
        cli = BufferedEventStorage(inner, tmp_path)  # e.g. `omniq enqueue`
        held = events(3)
        await cli.append_many(held)
        worker = BufferedEventStorage(inner, tmp_path)
        inner.down = False
        assert await worker.adopt_orphans() == 0  # its writer lives (holds the lock)
        inner.down = True
        await cli.close()  # the CLI exits while the store is down
        assert len(list(tmp_path.glob("*.jsonl"))) == 1
        inner.down = False
        assert await worker.adopt_orphans() == 3
        assert await stored(inner) == held
        assert not list(tmp_path.glob("*.jsonl"))
        await worker.adopt_orphans()
        assert await stored(inner) == held  # written once

    run(body)


def test_close_writes_what_is_held_when_the_store_is_back(tmp_path: Path) -> None:
    async def body() -> None:
        inner = Flaky()
        inner.down = True
        buf = BufferedEventStorage(inner, tmp_path)
        held = events(4)
        await buf.append_many(held)
        inner.down = False
        await buf.close()
        assert await stored(inner) == held
        assert not list(tmp_path.glob("*.jsonl"))

    run(body)


def test_reads_go_to_the_real_store(tmp_path: Path) -> None:
    async def body() -> None:
        inner = Flaky()
        buf = BufferedEventStorage(inner, tmp_path)
        batch = events(2)
        await buf.append_many(batch)
        assert await buf.get(batch[0].task_id) == batch
        assert await buf.last_cursor() == await inner.last_cursor()
        assert [e for _, e in await buf.latest(1)] == batch[1:]

    run(body)
