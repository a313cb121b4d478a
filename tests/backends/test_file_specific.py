"""File backend behaviour beyond the conformance suite: atomicity, crashes, races, TTL layout,
one Backend per place and its fused operations."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from omniq import registry
from omniq.backends.file import (
    FileBackend,
    FileEventStorage,
    FileQueue,
    FileResultStorage,
    LocalFileBackend,
    common,
    stores,
)
from omniq.backends.file import failed as file_failed
from omniq.backends.file import queue as file_queue
from omniq.errors import BackendError, BackendUnavailable, ConfigError
from omniq.models import (
    Delivery,
    EventType,
    Task,
    TaskEvent,
    TaskResult,
    TaskStatus,
    new_task_id,
    seconds_from_now,
    utcnow,
)
from omniq.serialization import UNDECODABLE_FUNC, encode_task
from omniq.storage import fused_ops

from .conftest import TECHS

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
                stored = TaskResult(task_id, TaskStatus.COMPLETED, value=values[i % 3])
                assert await writer.store(stored) is True
                await asyncio.sleep(0.01)
                assert await writer.delete(task_id) is True  # clears the way for the next
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
    # Only an id marker of a task killed between its marker and its rename may be left.
    assert len(os.listdir(os.path.join(qdir, "queue", "ids"))) <= kills


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


def test_an_undecodable_task_file_is_delivered_with_its_real_id(tmp_path: Path) -> None:
    """Once moved to queue/corrupt, leaving its task pending forever (issue 8, item 3)."""

    async def body() -> None:
        q = FileQueue(tmp_path)
        odd = Task(func="m:f", id="nightly:2030-01-31=1", queue="cq")  # no file name: hashed
        good = Task(func="m:f", queue="cq", priority=-1)
        await q.enqueue(odd)
        await q.enqueue(good)
        (path,) = [p for p in (tmp_path / "queue" / "ready" / "cq").iterdir()
                   if odd.id not in p.name and good.id not in p.name]
        path.write_bytes(b"{not json")
        placeholder = await q.get_task(odd.id)
        assert placeholder is not None and placeholder.id == odd.id
        assert placeholder.func == UNDECODABLE_FUNC and placeholder.queue == "cq"
        assert {s.queue: s.queued for s in await q.stats()} == {"cq": 2}
        d = await q.dequeue(["cq"], 30, 0)
        assert d is not None and d.task.id == odd.id and d.problem
        assert await q.ack(d, failed=True) is True
        after = await q.dequeue(["cq"], 30, 0)
        assert after is not None and after.task == good and after.problem is None
        assert await q.ack(after) is True
        assert [(s.queue, s.failed) for s in await q.stats()] == [("cq", 1)]
        dead = await q.get_task(odd.id)  # a dead letter now
        assert dead is not None and (dead.id, dead.func) == (odd.id, UNDECODABLE_FUNC)
        assert await q.purge() == 1
        assert not (tmp_path / "queue" / "corrupt").exists()
        await q.close()

    run(body())


def test_cancel_and_the_worker_list_take_undecodable_files_in_their_stride(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        q = FileQueue(tmp_path)
        t = Task(func="m:f", unique_key="k")
        await q.enqueue(t)
        (path,) = (tmp_path / "queue" / "ready" / "default").iterdir()
        path.write_bytes(b"\xff")
        assert await q.cancel(t.id) is True
        assert await q.stats() == []
        (tmp_path / "queue" / "workers" / "bad.json").write_bytes(b"[")
        os.utime(tmp_path / "queue" / "workers" / "bad.json", (time.time() + 60,) * 2)
        assert await q.workers() == []
        await q.close()

    run(body())


def test_files_an_older_omniq_set_aside_are_delivered_to_be_failed(tmp_path: Path) -> None:
    corrupt = tmp_path / "queue" / "corrupt"
    corrupt.mkdir(parents=True)
    tid = new_task_id()
    ready = f"1000000000~{time.time_ns() // 1000:017d}~{tid}~0"
    (corrupt / f"{time.time_ns() // 1000:017d}~a1b2c3d4e5f6~default~{ready}").write_text("{bad")

    async def body() -> None:
        q = FileQueue(tmp_path)
        d = await q.dequeue(["default"], 30, 0)
        assert d is not None and d.task.id == tid and d.problem and d.attempt == 1
        assert await q.ack(d, failed=True) is True
        await q.close()

    run(body())
    assert list(corrupt.iterdir()) == []


# --- leases: heartbeats, not clocks -----------------------------------------------------


def test_a_lease_is_judged_by_its_heartbeats_not_by_wall_clocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's clock an hour off must neither take a live lease nor keep a dead one
    (issue 8, item 5: the old names held a wall-clock deadline that other processes compared)."""
    real = common.now_us
    offsets: dict[int, int] = {}  # thread ident -> microseconds its clock is off
    monkeypatch.setattr(
        file_queue, "now_us", lambda: real() + offsets.get(threading.get_ident(), 0)
    )

    async def clock_of(q: FileQueue, hours: int) -> None:
        ident = await q._call(lambda box: threading.get_ident())  # the store's own thread
        offsets[ident] = hours * 3_600_000_000

    async def beat(q: FileQueue, d: Delivery, seconds: float) -> None:
        for _ in range(int(seconds / 0.25)):
            await asyncio.sleep(0.25)
            assert await q.extend(d, 1.0) is True

    async def body() -> None:
        # Three processes: each its own Backend, with its own thread and clock.
        holder, ahead, behind = (LocalFileBackend(tmp_path).queue() for _ in range(3))
        await clock_of(ahead, +1)
        await clock_of(behind, -1)
        t = await holder.enqueue(Task(func="m:f"))
        d = await holder.dequeue(["default"], 1.0, 0)
        assert d is not None
        beating = asyncio.create_task(beat(holder, d, 2.5))
        assert await ahead.dequeue(["default"], 1.0, 2.0) is None  # two lease lengths
        await beating
        # The holder stops beating, as if killed: taken over after about one lease,
        # by a process whose clock is an hour behind.
        start = time.monotonic()
        again = await behind.dequeue(["default"], 1.0, 6)
        assert again is not None and again.task.id == t and again.attempt == 2
        assert time.monotonic() - start >= 0.5
        assert await holder.ack(d) is False
        assert await behind.ack(again) is True
        for q in (holder, ahead, behind):
            await q.close()

    run(body())


def test_leases_named_by_an_older_omniq_are_still_reclaimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_queue, "_LEGACY_LEASE_MS", 300)
    t = Task(func="m:f")
    leased = tmp_path / "queue" / "leased"
    leased.mkdir(parents=True)
    ready = f"1000000000~{time.time_ns() // 1000:017d}~{t.id}~0"
    deadline = time.time_ns() // 1000 + 3_600_000_000  # far ahead: never compared now
    (leased / f"{deadline:017d}~a1b2c3d4e5f6~default~{ready}").write_bytes(encode_task(t))

    async def body() -> None:
        q = FileQueue(tmp_path)
        assert [(s.queue, s.running) for s in await q.stats()] == [("default", 1)]
        d = await q.dequeue(["default"], 30, 5)
        assert d is not None and d.task == t and d.attempt == 2
        assert await q.ack(d) is True
        await q.close()

    run(body())


# --- ids and unique keys -------------------------------------------------------------------


def test_an_id_marker_a_crash_left_does_not_block_its_task(tmp_path: Path) -> None:
    t = Task(func="m:f")
    ids = tmp_path / "queue" / "ids"
    ids.mkdir(parents=True)
    (ids / t.id).write_text(t.id)  # its producer died between marker and rename

    async def body() -> None:
        q = FileQueue(tmp_path)
        assert await q.enqueue(t) == t.id
        d = await q.dequeue(["default"], 30, 0)
        assert d is not None and d.task == t
        assert await q.ack(d) is True
        await q.close()

    run(body())
    assert list(ids.iterdir()) == []


def test_unique_key_holds_outlive_the_process_and_are_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body() -> None:
        q = FileQueue(tmp_path)
        first = await q.enqueue(Task(func="m:f", unique_key="daily", unique_ttl=0.6))
        d = await q.dequeue(["default"], 30, 0)
        assert d is not None and await q.ack(d) is True
        await q.close()
        again = FileQueue(tmp_path)  # another process, later
        assert await again.enqueue(Task(func="m:f", unique_key="daily")) == first
        assert len(list((tmp_path / "queue" / "held").iterdir())) == 1
        await asyncio.sleep(0.8)
        monkeypatch.setattr(file_queue, "_SWEEP_EVERY", 0.0)
        assert await again.dequeue(["default"], 30, 0) is None  # a claim sweeps now and then
        assert list((tmp_path / "queue" / "held").iterdir()) == []
        fresh = Task(func="m:f", unique_key="daily")
        assert await again.enqueue(fresh) == fresh.id
        await again.close()

    run(body())


# --- results and events stored once -------------------------------------------------------


def test_a_result_store_sent_again_is_not_a_lost_race(base: str) -> None:
    async def body() -> None:
        s = FileResultStorage(base)
        r = result()
        assert await s.store(r) is True
        assert await s.store(r) is True  # the same bytes: our own write, sent again
        assert await s.store(TaskResult(r.task_id, TaskStatus.FAILED)) is False
        assert await s.get(r.task_id) == r
        assert len([f for f in stored_files(base) if f.startswith("results-index/")]) == 1
        await s.close()

    run(body())


def test_an_append_retried_through_the_same_handle_is_stored_once(
    base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first append wrote the log copy, then failed: the retry must not add another."""
    s = FileEventStorage(base)
    event = TaskEvent(new_task_id(), EventType.STARTED, attempt=1)
    files = run(s._call(lambda files: files))
    # The per-task copy is made after the log copy: its maker fails, once.
    name = "_link" if hasattr(files, "_link") else "create_all"
    make = getattr(files, name)

    def broken(*args: Any) -> Any:
        if "events/tasks/" not in str(args[-2] if name == "_link" else args[0]):
            return make(*args)
        monkeypatch.setattr(files, name, make)
        raise ConnectionError("the store went away")

    monkeypatch.setattr(files, name, broken)
    with pytest.raises(BackendUnavailable):
        run(s.append(event))
    run(s.append(event))
    assert [e for _, e in run(s.read(None, 10))] == [event]
    assert run(s.get(event.task_id)) == [event]
    run(s.close())


def test_events_stored_before_ids_still_read_and_clean_up(base: str) -> None:
    """The layout before event ids: per-task copies named by their cursor, no ids inside."""
    import fsspec

    tid = new_task_id()
    stamp = utcnow() - timedelta(minutes=5)
    old = [f"{common.us(stamp) + i:017d}~a1b2c3d4e5f6~{i + 1:010d}~{tid}" for i in (0, 1)]
    fs, root = fsspec.core.url_to_fs(base)
    for i, stem in enumerate(old):
        record = {"task_id": tid, "event_type": ["enqueued", "started"][i],
                  "timestamp": stamp.timestamp() + i / 1e6, "attempt": i}
        data = json.dumps(record).encode()
        for rel in (stores._log_rel(stem), f"events/tasks/{tid}/{stem}.json"):
            fs.makedirs(f"{root}/{rel.rsplit('/', 1)[0]}", exist_ok=True)
            fs.pipe_file(f"{root}/{rel}", data)

    async def body() -> None:
        s = FileEventStorage(base)
        before = await s.get(tid)
        assert [e.event_type for e in before] == [EventType.ENQUEUED, EventType.STARTED]
        assert all(e.id.startswith("legacy-") for e in before)
        done = TaskEvent(tid, EventType.COMPLETED, attempt=1)
        await s.append(done)
        assert await s.get(tid) == [*before, done]
        rows = await s.read(None, 10)
        assert [e for _, e in rows] == [*before, done]
        assert [e for _, e in await s.read(rows[0][0], 10)] == [before[1], done]
        assert await s.cleanup(utcnow() + timedelta(seconds=1)) == 3
        assert await s.get(tid) == []
        assert [f for f in stored_files(base) if not f.startswith(".tmp")] == []
        await s.close()

    run(body())


def test_s3_writes_whose_replies_were_lost_are_stored_once() -> None:
    """The client library sends a PUT again when its reply is lost: a conditional create
    then fails against our own first copy, which must count as ours."""
    from tests.faultproxy import FaultProxy

    s3 = TECHS["file-s3"]  # the plug-in the conformance suite loaded: one moto server
    if s3.unavailable():
        pytest.skip(str(s3.unavailable()))
    host, port = s3.endpoint().rsplit("//", 1)[1].split(":")
    prefix = f"lost-{uuid.uuid4().hex[:8]}"
    with FaultProxy(host, int(port)) as proxy:
        options = s3.storage_options(f"http://127.0.0.1:{proxy.port}")
        base = f"s3://{s3.BUCKET}/{prefix}"

        async def body() -> None:
            results, events = FileResultStorage(base, options), FileEventStorage(base, options)
            r = result()
            proxy.lose_reply(match=f"/{prefix}/results/".encode())
            assert await results.store(r) is True
            assert await results.get(r.task_id) == r
            assert await results.store(result(task_id=r.task_id)) is False
            event = TaskEvent(r.task_id, EventType.COMPLETED)
            proxy.lose_reply(match=f"/{prefix}/events/tasks/".encode())
            proxy.lose_reply(match=f"/{prefix}/events/log/".encode())
            await events.append(event)
            assert await events.get(r.task_id) == [event]
            assert [e for _, e in await events.read(None, 10)] == [event]
            assert proxy.injected["lose_reply"] == 3
            await results.close()
            await events.close()

        run(body())


# --- TTL cleanup ------------------------------------------------------------------------


def result(**kw: Any) -> TaskResult:
    kw.setdefault("task_id", new_task_id())
    return TaskResult(status=TaskStatus.COMPLETED, value=1, **kw)


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
    # A setting of another technology is refused, not ignored.
    with pytest.raises(ConfigError, match=r"does not use 'url'.*takes: base_dir"):
        registry.create("file", "queue", {"base_dir": str(tmp_path), "url": "redis://x"})


# --- one Backend per place: its roles and fused operations ---------------------------------


def roles_on(base: str, **settings: Any) -> list[Any]:
    return [registry.create("file", role, {"base_dir": base, **settings})
            for role in registry.ROLES]


def enqueued(t: Task) -> TaskEvent:
    return TaskEvent(t.id, EventType.ENQUEUED, queue=t.queue)


def kinds(events: list[TaskEvent]) -> list[tuple[str, int]]:
    return [(e.event_type.value, e.attempt) for e in events]


def test_the_roles_of_one_place_share_one_backend(tmp_path: Path) -> None:
    q, r, e = roles_on(str(tmp_path))
    assert isinstance(q.backend, LocalFileBackend)
    assert q.backend is r.backend is e.backend
    assert fused_ops(q, r, e) is q.backend
    # The seed's constructors reach the same Backend, whatever the path's spelling.
    assert FileResultStorage(tmp_path).backend is q.backend
    assert FileQueue(f"file://{tmp_path}").backend is q.backend
    # Another durability is another Backend: no fused writes across the two.
    lax = registry.create("file", "results", {"base_dir": str(tmp_path),
                                               "options": {"durable": False}})
    assert lax.backend is not q.backend and fused_ops(q, lax, e) is None
    # An object store holds results and events, and no queue (so no fused operations).
    remote = FileResultStorage("memory://one-place")
    assert type(remote.backend) is FileBackend
    assert FileEventStorage("memory://one-place").backend is remote.backend
    with pytest.raises(ConfigError, match="atomic rename"):
        remote.backend.queue()


def test_the_last_store_closed_stops_the_backends_threads(tmp_path: Path) -> None:
    def threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("omniq-file")]

    async def body() -> None:
        before = threads()
        q, r, e = roles_on(str(tmp_path / "place"))
        for store in (q, r, e):
            await store.open()
        t = Task(func="m:f")
        await fused_ops(q, r, e).submit(t, enqueued(t))  # type: ignore[union-attr]
        assert await r.get(t.id) is None
        assert len(threads()) > len(before)
        await q.close()
        await r.close()
        assert await e.get(t.id)  # still open: its Backend still runs
        await e.close()
        assert threads() == before
        assert roles_on(str(tmp_path / "place"))[0].backend is not q.backend  # made anew

    run(body())


def test_each_fused_operation_is_one_call_to_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a task costs on one Backend: one thread call per operation (the generic path
    takes two per enqueue, two per claim and three per finish), and the fsyncs that make
    each file durable (14 per task; 18 before an event's two copies shared an inode)."""
    counts = {"calls": 0, "fsyncs": 0}
    real_run, real_fsync = LocalFileBackend.run, os.fsync

    async def counted_run(self: Any, lane: str, fn: Any, *args: Any) -> Any:
        counts["calls"] += 1
        return await real_run(self, lane, fn, *args)

    def counted_fsync(fd: int) -> None:
        counts["fsyncs"] += 1
        real_fsync(fd)

    monkeypatch.setattr(LocalFileBackend, "run", counted_run)
    monkeypatch.setattr(os, "fsync", counted_fsync)

    def taken() -> tuple[int, int]:
        got = (counts["calls"], counts["fsyncs"])
        counts.update(calls=0, fsyncs=0)
        return got

    async def body() -> None:
        b = LocalFileBackend(tmp_path)
        await b.on_box(lambda box: None)  # made its directories
        taken()
        t = Task(func="m:f")
        await b.submit(t, enqueued(t))
        assert taken() == (1, 5)  # the event (one file, two folders), the task (file, folder)
        (d,) = await b.claim(["default"], 30, 0, 4, "w1")
        assert taken() == (1, 3)  # the lease is a rename; STARTED
        r = TaskResult(t.id, TaskStatus.COMPLETED, value=1, attempts=1)
        assert await b.finish(d, r, TaskEvent(t.id, EventType.COMPLETED, attempt=1),
                              failed=False)
        assert taken() == (1, 6)  # its index marker's folder, the result, the event
        await b.close()

    run(body())


def test_a_fused_claim_that_cannot_store_started_hands_its_tasks_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not stranded until their leases run out, with an attempt counted."""

    async def body() -> None:
        b = LocalFileBackend(tmp_path)
        tasks = [Task(func="m:f") for _ in range(3)]
        for t in tasks:
            await b.submit(t, enqueued(t))
        files = b.files()
        publish_all = files.publish_all

        def full(items: Any) -> Any:
            monkeypatch.setattr(files, "publish_all", publish_all)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(files, "publish_all", full)
        with pytest.raises(BackendError, match="No space left"):
            await b.claim(["default"], 30, 0, 4, "w1")
        got = await b.claim(["default"], 30, 0, 4, "w1")
        assert [(d.task.id, d.attempt) for d in got] == [(t.id, 1) for t in tasks]
        for t in tasks:
            assert kinds(await b.events().get(t.id)) == [("enqueued", 0), ("started", 1)]
        await b.close()

    run(body())


def test_a_fused_finish_sent_again_after_a_failure_stores_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The result and its event were written, then the ack failed: the worker sends the
    finish again, which must count as its own and write nothing twice."""

    async def body() -> None:
        b = LocalFileBackend(tmp_path)
        t = Task(func="m:f")
        await b.submit(t, enqueued(t))
        (d,) = await b.claim(["default"], 30, 0, 1, "w1")
        result = TaskResult(t.id, TaskStatus.COMPLETED, value=3, attempts=1)
        event = TaskEvent(t.id, EventType.COMPLETED, attempt=1)
        ack = file_queue.Maildir.ack

        def broken(*args: Any) -> Any:
            monkeypatch.setattr(file_queue.Maildir, "ack", ack)
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(file_queue.Maildir, "ack", broken)
        with pytest.raises(BackendError):
            await b.finish(d, result, event, failed=False)
        assert await b.finish(d, result, event, failed=False) is True
        assert await b.results().get(t.id) == result
        assert kinds(await b.events().get(t.id)) == [
            ("enqueued", 0), ("started", 1), ("completed", 1)
        ]
        assert [e for _, e in await b.events().read(None, 10)][-1] == event
        assert len(await b.events().read(None, 10)) == 3
        assert await b.queue().get_task(t.id) is None
        await b.close()

    run(body())


FUSED_WORKER = """
    import asyncio, sys
    from omniq import AsyncOmniQ
    from omniq.config import OmniQConfig
    from omniq.worker import Worker

    async def main(base):
        values = {"home": base, "event_policy": "strict", "worker_lease_seconds": 1.0}
        for prefix in ("task_queue", "result_storage", "event_storage"):
            values[prefix + "_type"] = "file"
            values[prefix + "_base_dir"] = base
        client = AsyncOmniQ(OmniQConfig.from_values(**values))
        await client.open()
        settings = client.worker_settings(register=False, allowed_modules=None)
        await Worker(client.queue, client.results, client.events, settings).run()

    asyncio.run(main(sys.argv[1]))
"""


def test_a_killed_worker_on_the_fused_path_loses_no_task_and_stores_one_outcome(
    tmp_path: Path,
) -> None:
    from omniq import AsyncOmniQ
    from omniq.config import OmniQConfig
    from omniq.worker import Worker

    base = str(tmp_path)
    values: dict[str, Any] = {"home": base, "event_policy": "strict",
                              "worker_lease_seconds": 1.0}
    for prefix in ("task_queue", "result_storage", "event_storage"):
        values.update({prefix + "_type": "file", prefix + "_base_dir": base})

    async def body() -> None:
        client = AsyncOmniQ(OmniQConfig.from_values(**values))
        await client.open()
        task_id = await client.options(retries=1).enqueue("omniq.examples:sleep", 1.0, "done")
        doomed = python(FUSED_WORKER, base)
        try:
            while not await client.events.get(task_id):  # ENQUEUED
                await asyncio.sleep(0.02)
            while len(await client.events.get(task_id)) < 2:  # STARTED: it runs now
                await asyncio.sleep(0.02)
        finally:
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(30)
        settings = client.worker_settings(register=False, allowed_modules=None, max_tasks=1,
                                          poll_interval=0.2)
        worker = Worker(client.queue, client.results, client.events, settings)
        assert await asyncio.wait_for(worker.run(), 30) == 1
        assert worker._fused is not None
        assert await client.get_result(task_id, timeout=0) == "done"
        assert kinds(await client.events.get(task_id)) == [
            ("enqueued", 0), ("started", 1), ("started", 2), ("completed", 2)
        ]
        await client.close()

    run(body())


# --- issue 11: dead letters by failure time, records, results in bulk ------------------------

_DAY_US, _MINUTE_US = 86_400_000_000, 60_000_000


async def fail_all(q: FileQueue, queue: str, n: int) -> None:
    for _ in range(n):
        d = await q.dequeue([queue], 30, 0)
        assert d is not None and await q.ack(d, failed=True) is True


def count_listings(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[str]:
    """Every folder listed from now on, relative to `root`."""
    listed: list[str] = []
    real = os.listdir

    def listing(path: Any = ".") -> list[str]:
        listed.append(os.path.relpath(path, root))
        return real(path)

    monkeypatch.setattr(os, "listdir", listing)
    return listed


def test_failed_lists_only_the_newest_folders_and_finds_dead_letters_by_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """60 dead letters over 3 days and 5 minutes a day, 200 waiting tasks: a page of 6
    lists 3 folders and reads 6 files; get_task, forget and a retry list none."""
    noon = (common.us(utcnow()) // _DAY_US - 3) * _DAY_US + _DAY_US // 2
    times = [noon + d * _DAY_US + m * _MINUTE_US + k
             for d in range(3) for m in range(5) for k in range(4)]

    async def body() -> None:
        q = FileQueue(tmp_path, durable=False)
        tasks = [Task(func="m:f", queue="dl") for _ in times]
        for t in tasks:
            await q.enqueue(t)
        for _ in range(200):
            await q.enqueue(Task(func="m:f", queue="busy"))
        clock = iter(times)
        with monkeypatch.context() as m:
            m.setattr(file_queue, "_ready_time", lambda: next(clock))
            await fail_all(q, "dl", len(tasks))
        listed = count_listings(monkeypatch, tmp_path / "queue")
        page = await q.failed("dl", limit=6)
        assert [f.task.id for f in page] == [t.id for t in tasks[::-1][:6]]
        assert [common.us(f.failed_at) for f in page] == times[::-1][:6]  # the stored us
        day, last, before_last = (file_failed.bucket_of(t) for t in (times[-1], times[-1],
                                                                        times[-5]))
        assert listed == ["failed/dl", f"failed/dl/{day[:8]}", f"failed/dl/{last}",
                          f"failed/dl/{before_last}"]
        listed.clear()
        older = await q.failed(before=page[-1].failed_at, limit=60)
        assert [f.task.id for f in older] == [t.id for t in tasks[::-1][6:]]
        assert not [p for p in listed if p.startswith("ready")]
        listed.clear()
        first_day = await q.failed("dl", before=common.utc(noon + 3_600_000_000), limit=3)
        assert [f.task.id for f in first_day] == [t.id for t in tasks[19:16:-1]]
        assert listed[:2] == ["failed/dl", f"failed/dl/{file_failed.bucket_of(times[0])[:8]}"]
        listed.clear()
        since = await q.failed("dl", since=page[2].failed_at)
        assert [f.task.id for f in since] == [t.id for t in tasks[::-1][:3]]
        listed.clear()
        assert await q.get_task(tasks[0].id) == tasks[0]
        assert await q.enqueue(tasks[1]) == tasks[1].id  # a retry: out of the tree
        assert await q.forget([tasks[2].id]) == 1
        assert listed == []  # found by their hints
        assert await q.forget([tasks[1].id]) == 0  # no dead letter: only the queues' tops
        assert listed == ["failed", "failed/dl"]  # (for one an older OmniQ may have filed)
        assert {s.queue: s.failed for s in await q.stats()} == {"busy": 0, "dl": 58}
        await q.close()

    run(body())


def test_dead_letters_of_the_flat_layout_are_moved_into_the_index(tmp_path: Path) -> None:
    """Filed by the OmniQ of issue 10 (failed/<queue>/<ready name>), before this one
    opened the store or while it runs beside it: listed by failure time (their ctime),
    found by id, forgotten and retried."""
    root = tmp_path / "queue"
    (root / "failed" / "old").mkdir(parents=True)
    (root / "ids").mkdir()

    def file_old(t: Task) -> tuple[int, int]:
        name = f"1000000000~{time.time_ns() // 1000:017d}~{t.id}~1"
        (root / "ids" / t.id).write_text(t.id)
        before = time.time_ns() // 1000
        (root / "tmp").mkdir(exist_ok=True)
        (root / "tmp" / name).write_bytes(encode_task(t))
        os.rename(root / "tmp" / name, root / "failed" / "old" / name)
        return before, time.time_ns() // 1000

    old = [Task(func="m:f", queue="old") for _ in range(3)]
    spans = []
    for t in old:
        spans.append(file_old(t))
        time.sleep(0.002)

    async def body() -> None:
        backend = LocalFileBackend(tmp_path)
        q = backend.queue()
        await q.open()
        assert [p.name for p in (root / "failed" / "old").iterdir() if "~" in p.name] == []
        listed = await q.failed()
        assert [f.task for f in listed] == old[::-1]
        for f, (before, after) in zip(listed, spans[::-1], strict=True):
            assert before - 5000 <= common.us(f.failed_at) <= after + 5000
        assert await q.get_task(old[0].id) == old[0]
        assert [(s.queue, s.failed) for s in await q.stats()] == [("old", 3)]
        assert await q.forget([old[0].id]) == 1
        assert await q.enqueue(old[1]) == old[1].id
        d = await q.dequeue(["old"], 30, 0)
        assert d is not None and d.task == old[1] and d.attempt == 1
        # An OmniQ of issue 10 still running beside this one files more.
        late, later = Task(func="m:f", queue="old"), Task(func="m:f", queue="old")
        file_old(late)
        assert await q.get_task(late.id) == late
        assert await q.forget([late.id]) == 1
        file_old(later)
        assert [f.task.id for f in await q.failed("old")] == [later.id, old[2].id]
        await q.close()

    run(body())


def test_forget_frees_the_key_the_hint_and_the_folders(tmp_path: Path) -> None:
    async def body() -> None:
        q = FileQueue(tmp_path)
        t = Task(func="m:f", queue="fk", unique_key="only", unique_ttl=3600)
        await q.enqueue(t)
        await fail_all(q, "fk", 1)
        (path,) = (tmp_path / "queue" / "failed" / "fk").glob("*/*/*")
        hint = tmp_path / "queue" / "dead" / t.id
        assert os.readlink(hint) == f"fk/{path.name.split('~')[0]}"
        other = Task(func="m:f", queue="fk", unique_key="only")
        assert await q.enqueue(other) == t.id  # the key is held for its unique_ttl
        assert await q.forget([t.id, other.id, t.id]) == 1
        assert await q.enqueue(other) == other.id  # freed with its dead letter
        assert not hint.exists() and not (tmp_path / "queue" / "ids" / t.id).exists()
        assert list((tmp_path / "queue" / "failed" / "fk").iterdir()) == []
        assert await q.forget([]) == 0
        await q.close()

    run(body())


def test_an_undecodable_dead_letter_is_listed_as_a_placeholder(tmp_path: Path) -> None:
    async def body() -> None:
        q = FileQueue(tmp_path)
        odd = Task(func="m:f", id="nightly:2030-01-31=1", queue="bad")  # hashed sid
        await q.enqueue(odd)
        await fail_all(q, "bad", 1)
        (path,) = (tmp_path / "queue" / "failed" / "bad").glob("*/*/*")
        path.write_bytes(b"{not json")
        (dead,) = await q.failed("bad")
        assert (dead.task.id, dead.task.func, dead.task.queue) == (odd.id, UNDECODABLE_FUNC,
                                                                   "bad")
        assert await q.forget([odd.id]) == 1
        assert await q.failed() == []
        await q.close()

    run(body())


def test_records_are_files_beside_the_queue_and_refuse_unsafe_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body() -> None:
        q = FileQueue(tmp_path)
        for bad in ("..", "../x", "a/b", ".hidden", ""):
            with pytest.raises(ValueError):
                await q.get_record("cancel", bad)
            with pytest.raises(ValueError):
                await q.delete_record("cancel", bad)
            with pytest.raises(ValueError):
                await q.list_records(bad)
        await q.put_record("schedule", "nightly", b"v1")
        assert (tmp_path / "queue" / "records" / "schedule" / "nightly").read_bytes() == b"v1"
        other = LocalFileBackend(tmp_path).queue()  # as another process has it
        await other.open()
        await other.put_record("schedule", "nightly", b"v2")
        assert await q.get_record("schedule", "nightly") == b"v2"
        listed = count_listings(monkeypatch, tmp_path / "queue")
        assert await q.list_records("cancel") == []  # a busy worker's look, once a second
        assert listed == ["records/cancel"]
        await other.close()
        await q.close()

    run(body())


def test_a_fused_claim_stores_no_started_for_a_task_that_waits_for_others(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        b = LocalFileBackend(tmp_path)
        first = Task(func="m:f")
        waits = Task(func="m:f", after=(first.id,))
        for t in (first, waits):
            await b.submit(t, enqueued(t))
        got = await b.claim(["default"], 30, 0, 4, "w1")
        assert [d.task.id for d in got] == [first.id, waits.id]
        assert kinds(await b.events().get(first.id)) == [("enqueued", 0), ("started", 1)]
        assert kinds(await b.events().get(waits.id)) == [("enqueued", 0)]
        q = b.queue()
        await q.release(got[1], 30)  # its dependency runs: back later, attempt not counted
        assert [(s.scheduled, s.running) for s in await q.stats()] == [(1, 1)]
        (name,) = os.listdir(tmp_path / "queue" / "ready" / "default")
        assert name.endswith(f"~{waits.id}~0")
        await b.close()

    run(body())


def test_get_many_on_s3_reads_concurrently_in_one_thread_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s3 = TECHS["file-s3"]
    if s3.unavailable():
        pytest.skip(str(s3.unavailable()))
    base = f"s3://{s3.BUCKET}/many-{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        store = FileResultStorage(base, s3.storage_options(s3.endpoint()))
        await store.open()
        stored = [result() for _ in range(8)]
        for r in stored:
            await store.store(r)
        fs = store.backend.files().fs  # type: ignore[attr-defined]
        real_cat, real_run = fs._cat_file, FileBackend.run
        seen = {"now": 0, "most": 0, "calls": 0}

        async def slow_cat(path: str, *args: Any, **kw: Any) -> Any:
            seen["now"] += 1
            seen["most"] = max(seen["most"], seen["now"])
            try:
                await asyncio.sleep(0.05)
                return await real_cat(path, *args, **kw)
            finally:
                seen["now"] -= 1

        async def counted_run(self: Any, lane: str, fn: Any, *args: Any) -> Any:
            seen["calls"] += 1
            return await real_run(self, lane, fn, *args)

        monkeypatch.setattr(fs, "_cat_file", slow_cat)
        monkeypatch.setattr(FileBackend, "run", counted_run)
        got = await store.get_many([r.task_id for r in stored] + [new_task_id()])
        assert got == {r.task_id: r for r in stored}
        assert seen["calls"] == 1 and seen["most"] == len(stored) + 1
        await store.close()

    run(body())


DEAD_LETTER_CHURN = """
    import random, sys, time
    from omniq.backends.file.queue import Maildir

    root, role, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    box, rnd, end = Maildir(root, durable=False), random.Random(seed), time.time() + 1.5
    while time.time() < end:
        if role == "fail":
            for d in box.claim(["q"], 30, 4):
                box.ack(d.receipt, d.task, True)
            continue
        page = box.failed("q", None, None, 50)
        picked = rnd.sample(page, min(5, len(page)))
        if rnd.random() < 0.5:
            box.forget([f.task.id for f in picked])
            continue
        for f in picked:
            box.enqueue(f.task)  # a retry
"""


def test_dead_letters_failed_retried_and_forgotten_at_once_stay_consistent(
    tmp_path: Path,
) -> None:
    """Two processes fail tasks while three retry or forget what failed() lists: every
    task is in one place, with its id marker, and every dead letter has its hint. (When
    forget unlinked the marker after its other work, a retry could reuse a marker about
    to go, and the next retry queued a second copy of the task.)"""
    root = tmp_path / "queue"

    async def fill() -> None:
        q = FileQueue(tmp_path, durable=False)
        for _ in range(1500):
            await q.enqueue(Task(func="m:f", queue="q"))
        await q.close()

    run(fill())
    roles = ["fail", "fail", "churn", "churn", "churn"]
    procs = [python(DEAD_LETTER_CHURN, str(root), role, str(i)) for i, role in enumerate(roles)]
    assert [p.wait(60) for p in procs] == [0] * len(roles)
    box = file_queue.Maildir(str(root), durable=False)
    dead = [file_failed.parse_dead(n) for _, n in file_failed.every(str(root / "failed" / "q"))]
    ready = [file_queue._Ready.parse(n) for n in os.listdir(root / "ready" / "q")]
    sids = [d[1] for d in dead if d] + [r.sid for r in ready if r]
    assert len(sids) == len(set(sids)) < 1500  # some were forgotten
    assert not os.listdir(root / "leased")
    assert sorted(os.listdir(root / "ids")) == sorted(sids)
    assert all(box.hints.find(d[1]) for d in dead if d)
    assert len(box.failed("q", None, None, 5000)) == len(dead) > 0
