"""Many processes on one set of SQLite files: every task runs once, nothing is lost or locked."""

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
def test_producers_and_consumers_in_separate_processes(tmp_path: Path) -> None:
    # No file exists yet: six processes also race to create the schemas.
    deadline = time.monotonic() + 90
    consumers = [
        _spawn(_CONSUMER, tmp_path, tmp_path / f"consumer-{i}.json") for i in range(CONSUMERS)
    ]
    producers = [
        _spawn(_PRODUCER, tmp_path, TASKS // PRODUCERS, tmp_path / f"producer-{i}.json")
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
    asyncio.run(_check_stores(tmp_path, set(enqueued)))


def _load(path: Path) -> list[list[object]]:
    with open(path) as f:
        data: list[list[object]] = json.load(f)
    return data


async def _check_stores(base: Path, ids: set[str]) -> None:
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
    finally:
        for s in (q, r, e):
            await s.close()
