"""Many processes on one set of SQLite files: every task runs once, nothing is lost or
locked; through the three stores one by one, and through the fused operations."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from omniq.backends.sqlite import SQLiteEventStorage, SQLiteQueue, SQLiteResultStorage
from omniq.models import EventType

PRODUCERS = 2
CONSUMERS = 4
TASKS = 2000

# Children are separate interpreters (like `omniq worker` processes): each writes a
# JSON report and exits non-zero on any exception.
_PRODUCER = """
import asyncio, json, sys
from omniq.backends.sqlite import SQLiteQueue
from omniq.models import Task

async def main(base, count, report):
    q = SQLiteQueue(database_path=base + "/queue.db")
    ids = []
    for i in range(count):
        ids.append(await q.enqueue(Task(func="omniq.examples:add", args=(i, 1))))
    await q.close()
    with open(report, "w") as f:
        json.dump(ids, f)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""

_CONSUMER = """
import asyncio, json, os, sys
from omniq.backends.sqlite import SQLiteEventStorage, SQLiteQueue, SQLiteResultStorage
from omniq.models import EventType, TaskEvent, TaskResult, TaskStatus

async def main(base, report):
    q = SQLiteQueue(database_path=base + "/queue.db")
    r = SQLiteResultStorage(database_path=base + "/results.db")
    e = SQLiteEventStorage(database_path=base + "/events.db")
    seen = []
    while True:
        d = await q.dequeue(["default"], 60.0, 0.5)
        if d is None:
            if os.path.exists(base + "/producers-done"):
                break
            continue
        seen.append([d.task_id, d.attempt])
        await e.append(TaskEvent(task_id=d.task_id, event_type=EventType.STARTED,
                                 attempt=d.attempt, worker_id=str(os.getpid())))
        value = d.task.args[0] + d.task.args[1]
        await r.store(TaskResult(task_id=d.task_id, status=TaskStatus.COMPLETED, value=value,
                                 attempts=d.attempt, worker_id=str(os.getpid())))
        await e.append(TaskEvent(task_id=d.task_id, event_type=EventType.COMPLETED,
                                 attempt=d.attempt, worker_id=str(os.getpid())))
        await q.ack(d)
    for s in (q, r, e):
        await s.close()
    with open(report, "w") as f:
        json.dump(seen, f)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


# The same through the fused operations of each process's one Backend: submit, a claim
# of up to 4 tasks with their STARTED events, finish (result + event + ack).
_FUSED_PRODUCER = """
import asyncio, json, sys
from omniq.backends.sqlite import shared_backend
from omniq.models import EventType, Task, TaskEvent

async def main(base, count, report):
    b = shared_backend({r: f"{base}/{r}.db" for r in ("queue", "results", "events")})
    ids = []
    for i in range(count):
        t = Task(func="omniq.examples:add", args=(i, 1))
        ids.append(await b.submit(t, TaskEvent(t.id, EventType.ENQUEUED, queue=t.queue)))
    await b.queue().close()
    with open(report, "w") as f:
        json.dump(ids, f)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""

_FUSED_CONSUMER = """
import asyncio, json, os, sys
from omniq.backends.sqlite import shared_backend
from omniq.models import EventType, TaskEvent, TaskResult, TaskStatus

async def main(base, report):
    b = shared_backend({r: f"{base}/{r}.db" for r in ("queue", "results", "events")})
    me = str(os.getpid())
    seen = []
    while True:
        got = await b.claim(["default"], 60.0, 0.5, 4, me)
        if not got:
            if os.path.exists(base + "/producers-done"):
                break
            continue
        for d in got:
            seen.append([d.task_id, d.attempt])
            value = d.task.args[0] + d.task.args[1]
            result = TaskResult(task_id=d.task_id, status=TaskStatus.COMPLETED, value=value,
                                attempts=d.attempt, worker_id=me)
            event = TaskEvent(task_id=d.task_id, event_type=EventType.COMPLETED,
                              attempt=d.attempt, worker_id=me)
            assert await b.finish(d, result, event, failed=False)
    await b.queue().close()
    with open(report, "w") as f:
        json.dump(seen, f)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

_CHILDREN = {"generic": (_PRODUCER, _CONSUMER), "fused": (_FUSED_PRODUCER, _FUSED_CONSUMER)}


def _spawn(code: str, *args: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], stderr=subprocess.PIPE
    )


def _finish(proc: subprocess.Popen[bytes], deadline: float) -> None:
    try:
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"child {proc.args[-2:]} did not finish in time")
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["generic", "fused"])
def test_producers_and_consumers_in_separate_processes(tmp_path: Path, path: str) -> None:
    # No file exists yet: six processes also race to create the schemas.
    producer, consumer = _CHILDREN[path]
    deadline = time.monotonic() + 90
    consumers = [
        _spawn(consumer, tmp_path, tmp_path / f"consumer-{i}.json") for i in range(CONSUMERS)
    ]
    producers = [
        _spawn(producer, tmp_path, TASKS // PRODUCERS, tmp_path / f"producer-{i}.json")
        for i in range(PRODUCERS)
    ]
    try:
        for p in producers:
            _finish(p, deadline)
        (tmp_path / "producers-done").touch()
        for c in consumers:
            _finish(c, deadline)
    finally:
        for proc in consumers + producers:
            if proc.poll() is None:
                proc.kill()

    enqueued = [tid for i in range(PRODUCERS) for tid in _load(tmp_path / f"producer-{i}.json")]
    deliveries = [d for i in range(CONSUMERS) for d in _load(tmp_path / f"consumer-{i}.json")]
    assert len(enqueued) == TASKS and len(set(enqueued)) == TASKS
    delivered = Counter(tid for tid, _ in deliveries)
    assert set(delivered) == set(enqueued)
    assert [tid for tid, n in delivered.items() if n > 1] == []  # no lease expired in 60 s
    assert all(attempt == 1 for _, attempt in deliveries)
    assert sum(1 for i in range(CONSUMERS) if _load(tmp_path / f"consumer-{i}.json")) > 1
    asyncio.run(_check_stores(tmp_path, set(enqueued), ordered=path == "fused"))


def _load(path: Path) -> list[list[object]]:
    with open(path) as f:
        data: list[list[object]] = json.load(f)
    return data


async def _check_stores(base: Path, ids: set[str], ordered: bool) -> None:
    q = SQLiteQueue(database_path=base / "queue.db")
    r = SQLiteResultStorage(database_path=base / "results.db")
    e = SQLiteEventStorage(database_path=base / "events.db")
    try:
        assert await q.stats() == []  # every task acked
        for tid in ids:
            result = await r.get(tid)
            assert result is not None and result.ok
        events = await e.read(None, 10 * TASKS)
        completed = Counter(ev.task_id for _, ev in events if ev.event_type == EventType.COMPLETED)
        started = Counter(ev.task_id for _, ev in events if ev.event_type == EventType.STARTED)
        assert set(completed) == ids and set(completed.values()) == {1}
        assert set(started) == ids and set(started.values()) == {1}
        cursors = [cur for cur, _ in events]
        assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
        if ordered:  # the fused writes store each task's events in their order
            kinds: dict[str, list[EventType]] = {}
            for _, ev in events:
                kinds.setdefault(ev.task_id, []).append(ev.event_type)
            expected = [EventType.ENQUEUED, EventType.STARTED, EventType.COMPLETED]
            assert {tid: k for tid, k in kinds.items() if k != expected} == {}
    finally:
        for s in (q, r, e):
            await s.close()
