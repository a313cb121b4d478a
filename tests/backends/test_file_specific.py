"""File backend behaviour beyond the conformance suite: atomicity, crashes, races, TTL layout."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from omniq import registry
from omniq.backends.file import FileEventStorage, FileQueue, FileResultStorage
from omniq.errors import ConfigError
from omniq.models import (
    EventType,
    Task,
    TaskEvent,
    TaskResult,
    TaskStatus,
    new_task_id,
    seconds_from_now,
    utcnow,
)

ROOT = Path(__file__).resolve().parents[2]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def python(script: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args], env=env, text=True, **kw
    )


@pytest.fixture(params=["local", "memory"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return f"memory://file-specific-{uuid.uuid4().hex[:10]}"


def stored_files(base: str) -> list[str]:
    """Every object under `base`, relative, whatever the filesystem."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(base)
    if not fs.exists(root):
        return []
    return sorted(p[len(root.rstrip("/")) + 1 :] for p in fs.find(root))


# --- atomic visibility ------------------------------------------------------------


def test_reader_never_sees_a_partial_result(base: str) -> None:
    task_id = new_task_id()
    values = ["a" * 3_000_000, "b" * 1_000_000, ["c" * 500_000] * 4]

    async def body() -> None:
        writer, reader = FileResultStorage(base), FileResultStorage(base)
        await writer.open()
        await reader.open()
        done = asyncio.Event()
        seen: list[Any] = []

        async def write() -> None:
            for i in range(24):
                await writer.store(TaskResult(task_id, TaskStatus.COMPLETED, value=values[i % 3]))
            done.set()

        async def read() -> None:
            while not done.is_set():
                got = await reader.get(task_id)  # a torn file would fail to decode here
                if got is not None:
                    seen.append(got.value)

        await asyncio.gather(write(), read())
        await writer.close()
        await reader.close()
        assert seen, "the reader never overlapped the writer"
        assert all(value in values for value in seen)

    run(body())


# --- the queue refuses object stores ------------------------------------------------


@pytest.mark.parametrize("url", ["s3://bucket/queue", "memory://queue", "gcs://bucket/q"])
def test_file_queue_refuses_object_stores(url: str) -> None:
    builders = [
        lambda: FileQueue(url),
        lambda: registry.create("file", "queue", {"base_dir": url}),
    ]
    for build in builders:
        with pytest.raises(ConfigError) as info:
            build()
        text = str(info.value)
        assert "atomic rename" in text
        assert "sqlite, redis, postgres or nats queue" in text
        assert "local/NFS path" in text


def test_file_queue_accepts_file_urls(tmp_path: Path) -> None:
    async def body() -> None:
        q = FileQueue(f"file://{tmp_path}/q")
        t = Task(func="omniq.examples:add", args=(1, 2))
        await q.enqueue(t)
        d = await q.dequeue(["default"], 30, 0)
        assert d is not None and d.task == t
        await q.close()

    run(body())


def test_importing_the_backend_does_not_import_fsspec(tmp_path: Path) -> None:
    script = """
        import sys
        import omniq, omniq.results, omniq.events
        from omniq.backends.file import FileEventStorage, FileResultStorage
        FileResultStorage(sys.argv[1]); FileEventStorage("memory://x")
        assert "fsspec" not in sys.modules, "fsspec imported too early"
    """
    proc = python(script, str(tmp_path))
    assert proc.wait(30) == 0


# --- crashes and races ----------------------------------------------------------------

PRODUCER = """
    import asyncio, random, sys
    from omniq.backends.file import FileQueue
    from omniq.models import Task

    async def main():
        q = FileQueue(sys.argv[1])
        await q.open()
        while True:
            blob = "x" * random.choice([10, 1000, 200_000])
            t = Task(func="omniq.examples:add", args=(blob, 1))
            await q.enqueue(t)
            print(t.id, flush=True)

    asyncio.run(main())
"""


def test_killed_producer_leaves_no_partial_task(tmp_path: Path) -> None:
    qdir = str(tmp_path / "q")
    reported: set[str] = set()
    kills = 4
    for _ in range(kills):
        proc = python(PRODUCER, qdir, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        reported.add(proc.stdout.readline().strip())  # it is enqueuing now
        time.sleep(random.uniform(0.02, 0.3))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        reported.update(line for line in out.splitlines() if line)

    async def drain() -> set[str]:
        q = FileQueue(qdir)
        got: set[str] = set()
        while (d := await q.dequeue(["default"], 30, 0)) is not None:
            assert d.task.func == "omniq.examples:add" and d.task.args[1] == 1
            got.add(d.task.id)
            await q.ack(d)
        await q.close()
        return got

    got = run(drain())
    assert reported <= got, "an enqueue that returned was lost"
    assert len(got - reported) <= kills  # at most the one in flight at each kill
    assert os.listdir(os.path.join(qdir, "queue", "corrupt")) == []


CONSUMER = """
    import asyncio, os, sys, time
    from omniq.backends.file import FileQueue

    async def main(qdir, out, go):
        q = FileQueue(qdir)
        await q.open()
        open(out + ".ready", "w").close()
        while not os.path.exists(go):
            time.sleep(0.005)
        got = []
        while (d := await q.dequeue(["default"], 60, 0.5)) is not None:
            got.append(d.task.id)
            await q.ack(d)
        with open(out, "w") as f:
            f.write("\\n".join(got))

    asyncio.run(main(*sys.argv[1:]))
"""


def test_four_processes_claim_every_task_exactly_once(tmp_path: Path) -> None:
    qdir = str(tmp_path / "q")

    async def fill() -> set[str]:
        q = FileQueue(qdir, durable=False)
        ids = {await q.enqueue(Task(func="omniq.examples:add", args=(i, 1))) for i in range(2000)}
        await q.close()
        return ids

    ids = run(fill())
    go = str(tmp_path / "go")
    outs = [str(tmp_path / f"consumer-{i}.txt") for i in range(4)]
    procs = [python(CONSUMER, qdir, out, go) for out in outs]
    deadline = time.monotonic() + 30
    while not all(os.path.exists(o + ".ready") for o in outs) and time.monotonic() < deadline:
        time.sleep(0.01)
    Path(go).touch()
    assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    claimed = [line for o in outs for line in Path(o).read_text().split("\n") if line]
    assert len(claimed) == len(set(claimed)), "a task was claimed twice"
    assert set(claimed) == ids


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_opened_stores_work_in_a_forked_child(tmp_path: Path) -> None:
    q, r = FileQueue(tmp_path), FileResultStorage(tmp_path)
    t = Task(func="omniq.examples:add", args=(1, 2))
    run(q.enqueue(t))
    run(r.get(t.id))  # both stores now have their threads running

    async def child() -> None:
        d = await q.dequeue(["default"], 30, 5)
        assert d is not None
        await r.store(TaskResult(d.task.id, TaskStatus.COMPLETED, value="from the child"))
        await q.ack(d)

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            asyncio.run(child())
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    got = run(r.wait(t.id, 5))
    assert got is not None and got.value == "from the child"
    assert run(q.get_task(t.id)) is None


def test_abandoned_unique_lock_is_taken_over(tmp_path: Path) -> None:
    """A producer killed between locking a unique key and publishing its task."""

    async def body() -> None:
        q = FileQueue(tmp_path)
        first = await q.enqueue(Task(func="m:f", unique_key="nightly"))
        (lock,) = (tmp_path / "queue" / "unique").iterdir()
        assert await q.cancel(first)
        assert not lock.exists()
        # A young lock may belong to an enqueue still in flight: it is honoured.
        orphan = new_task_id()
        lock.write_text(orphan)
        assert await q.enqueue(Task(func="m:f", unique_key="nightly")) == orphan
        # An old lock whose task exists nowhere was abandoned: it is taken over.
        os.utime(lock, (time.time() - 3600, time.time() - 3600))
        fresh = Task(func="m:f", unique_key="nightly")
        assert await q.enqueue(fresh) == fresh.id
        assert lock.read_text() == fresh.id
        await q.close()

    run(body())


def test_a_file_that_does_not_decode_is_set_aside(tmp_path: Path) -> None:
    async def body() -> None:
        q = FileQueue(tmp_path)
        good = await q.enqueue(Task(func="m:f"))
        ready = tmp_path / "queue" / "ready" / "default"
        (ready / "0000000000~00000000000000001~bogus~0").write_text("{not json")
        d = await q.dequeue(["default"], 30, 0)
        assert d is not None and d.task.id == good
        assert len(list((tmp_path / "queue" / "corrupt").iterdir())) == 1
        await q.close()

    run(body())


# --- TTL cleanup ------------------------------------------------------------------------


def result(**kw: Any) -> TaskResult:
    return TaskResult(task_id=new_task_id(), status=TaskStatus.COMPLETED, value=1, **kw)


def test_result_cleanup_reads_only_due_markers_and_leaves_no_garbage(base: str) -> None:
    async def body() -> None:
        s = FileResultStorage(base)
        old = result(expires_at=utcnow() - timedelta(hours=3))
        fresh = result(expires_at=seconds_from_now(3600))
        forever = result()
        moved = result(expires_at=utcnow() - timedelta(hours=2))
        for r in (old, fresh, forever, moved):
            await s.store(r)
        # Stored again without expiry: its old marker is stale, the result must stay.
        moved_again = TaskResult(moved.task_id, TaskStatus.COMPLETED, value=2)
        await s.store(moved_again)
        assert len([f for f in stored_files(base) if f.startswith("results-index/")]) == 5
        assert await s.cleanup(utcnow()) == 1
        assert await s.get(old.task_id) is None
        assert await s.get(moved.task_id) == moved_again
        assert await s.get(fresh.task_id) == fresh and await s.get(forever.task_id) == forever
        markers = [f for f in stored_files(base) if f.startswith("results-index/")]
        assert len(markers) == 3  # fresh, forever, moved_again: nothing stale left
        assert await s.cleanup(utcnow(), finished_before=seconds_from_now(1)) == 3
        assert [f for f in stored_files(base) if not f.startswith(".tmp")] == []
        await s.close()

    run(body())


def test_event_cleanup_drops_old_buckets_whole(base: str) -> None:
    async def body() -> None:
        s = FileEventStorage(base)
        now = utcnow()
        tids = [new_task_id() for _ in range(4)]
        ages = [timedelta(days=3), timedelta(days=2), timedelta(hours=1), timedelta(0)]
        for tid, age in zip(tids, ages, strict=True):
            await s.append(TaskEvent(tid, EventType.ENQUEUED, timestamp=now - age))
            await s.append(TaskEvent(tid, EventType.STARTED, timestamp=now - age))
        assert await s.cleanup(now - timedelta(days=1)) == 4
        assert await s.get(tids[0]) == [] and await s.get(tids[1]) == []
        assert [e.task_id for _, e in await s.read(None, 100)] == [tids[2]] * 2 + [tids[3]] * 2
        left = [f for f in stored_files(base) if not f.startswith(".tmp")]
        assert len(left) == 8  # four events, each in the log and under its task
        assert not any(tids[0] in f or tids[1] in f for f in left)
        if not base.startswith("memory://"):  # emptied day and task folders are removed too
            days = os.listdir(os.path.join(base, "events", "log"))
            assert len(days) <= 2
            assert len(os.listdir(os.path.join(base, "events", "tasks"))) == 2
        await s.close()

    run(body())


def test_cursor_resumes_between_writers_stamped_alike(base: str) -> None:
    """Same timestamp from two writers: a page-by-page read sees each event once, in order."""

    async def body() -> None:
        a, b = FileEventStorage(base), FileEventStorage(base)
        stamp = utcnow() - timedelta(days=1)  # back-dated: filed under this very timestamp
        tid = new_task_id()
        for i in range(5):
            await a.append(TaskEvent(tid, EventType.STARTED, timestamp=stamp, attempt=i,
                                     worker_id="a"))
            await b.append(TaskEvent(tid, EventType.STARTED, timestamp=stamp, attempt=i,
                                     worker_id="b"))
        seen: list[TaskEvent] = []
        cursor = None
        while rows := await a.read(cursor, 1):
            cursor = rows[-1][0]
            seen.append(rows[-1][1])
        assert len(seen) == 10
        for writer in ("a", "b"):
            assert [e.attempt for e in seen if e.worker_id == writer] == list(range(5))
        assert await b.read(cursor, 10) == []
        await a.close()
        await b.close()

    run(body())


def test_create_maps_settings_and_rejects_unknown_options(tmp_path: Path) -> None:
    store = registry.create("file", "results", {"base_dir": str(tmp_path), "options": {
        "durable": False}})
    assert isinstance(store, FileResultStorage)
    with pytest.raises(ConfigError, match="unknown file events option"):
        registry.create("file", "events", {"base_dir": str(tmp_path), "options": {"x": 1}})
    with pytest.raises(ConfigError, match="base_dir"):
        registry.create("file", "results", {})
