"""`event_policy: buffer`: tasks and enqueues go on while the event store is unreachable.

`BufferedEventStorage` wraps the configured event store. Writes go straight through
while it answers; once a write finds it unreachable, events are held in order (a
bounded list in memory, then a spill file under the data directory) and a background
task writes them back, oldest first, when the store returns. New events queue up
behind held ones, so each process keeps its order. When the spill file reaches its
bound, further events are dropped and counted (a log line, `omniq status`).

A process that exits with events still held leaves its spill file behind, and it is
locked (flock) while its writer lives: a worker sweeps the folder and writes the
files of processes that are gone. Writing an event twice is harmless: every event
store keeps one copy per event id.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from omniq.errors import BackendError, BackendUnavailable
from omniq.models import TaskEvent
from omniq.serialization import decode_event, encode_event
from omniq.storage import EventStorage

log = logging.getLogger("omniq.events")

BATCH = 500  # events per write while catching up
SWEEP_EVERY = 10.0  # seconds between looks for spill files of exited processes
FLUSH_AT_CLOSE = 3.0  # seconds a closing process tries to write what it holds
_SUFFIX = ".jsonl"


def _decoded_line(line: bytes) -> TaskEvent | None:
    if not line.strip():
        return None
    try:
        return decode_event(line)
    except BackendError:  # a torn last line (the process died mid-write): skip it
        return None


class _SpillFile:
    """Held events on disk, one JSON line each: append at the end, consume from the front."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path: Path | None = None
        self._file: IO[bytes] | None = None
        self._offset = 0  # bytes already written to the store
        self.count = 0  # events in the file not yet written
        self.size = 0

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"events-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp = self.folder / f".{name}.tmp"
            f = open(tmp, "a+b")  # noqa: SIM115 - held open (and locked) for our lifetime
            fcntl.flock(f, fcntl.LOCK_EX)  # locked before others can see it
            self.path = self.folder / f"{name}{_SUFFIX}"
            os.rename(tmp, self.path)
            self._file = f
        return self._file

    def append(self, lines: Sequence[bytes]) -> None:
        f = self._open()
        data = b"".join(line + b"\n" for line in lines)
        f.seek(0, os.SEEK_END)
        f.write(data)
        f.flush()
        self.count += len(lines)
        self.size += len(data)

    def peek(self, limit: int) -> list[TaskEvent]:
        if self._file is None or not self.count:
            return []
        self._file.seek(self._offset)
        events = []
        for _ in range(min(limit, self.count)):
            line = self._file.readline()
            if not line:
                break
            events.append(decode_event(line))
        return events

    def consume(self, n: int) -> None:
        assert self._file is not None
        self._file.seek(self._offset)
        for _ in range(n):
            self._offset += len(self._file.readline())
        self.count -= n
        if self.count <= 0:  # all written: start the file over
            self._file.truncate(0)
            self._offset = self.count = self.size = 0

    def rewrite(self, before: Sequence[bytes]) -> None:
        """Put `before` ahead of what the file still holds (at close: memory is older)."""
        rest = b""
        if self._file is not None:
            self._file.seek(self._offset)
            rest = self._file.read()
        f = self._open()
        f.seek(0)
        f.truncate(0)
        f.write(b"".join(line + b"\n" for line in before) + rest)
        f.flush()
        os.fsync(f.fileno())
        self._offset = 0
        self.count += len(before)

    def close(self) -> None:
        """Release the file: removed when empty, else left for a worker to write."""
        f, self._file = self._file, None
        if f is None:
            return
        if self.count <= 0 and self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        f.close()


class BufferedEventStorage:
    """An EventStorage whose writes never stop the work while the real store is away."""

    def __init__(
        self,
        inner: EventStorage,
        spill_dir: str | os.PathLike[str] | None,
        *,
        memory_limit: int = 10_000,
        spill_limit: int = 256 * 2**20,
    ) -> None:
        self.inner = inner
        # The Backend of the real store: on one Backend, fused writes bypass this buffer
        # (its queue and event store go down together, so there is nothing to hold).
        self.backend = getattr(inner, "backend", None)
        self._memory: collections.deque[TaskEvent] = collections.deque()
        self._memory_limit = memory_limit
        self._spill_limit = spill_limit
        self._spill = _SpillFile(Path(spill_dir)) if spill_dir is not None else None
        self._flusher: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._outage: float | None = None
        self.dropped = 0
        self._drop_logged = 0.0

    # --- what the worker and `omniq status` see ------------------------------------
    @property
    def held(self) -> int:
        return len(self._memory) + (self._spill.count if self._spill else 0)

    # --- writes ---------------------------------------------------------------------
    async def append(self, event: TaskEvent) -> None:
        await self.append_many([event])

    async def append_many(self, events: Sequence[TaskEvent]) -> None:
        if not events:
            return
        if self.held:  # behind held events: keep the order
            self._hold(events)
            return
        try:
            await self.inner.append_many(events)
        except BackendUnavailable as exc:
            self._begin_outage(exc)
            self._hold(events)
        except BackendError as exc:
            self._drop(len(events), f"the event store refused them: {exc}")

    def _hold(self, events: Sequence[TaskEvent]) -> None:
        spill = self._spill
        for i, event in enumerate(events):
            if (spill is None or not spill.count) and len(self._memory) < self._memory_limit:
                self._memory.append(event)
            elif spill is not None and spill.size < self._spill_limit:
                spill.append([encode_event(e) for e in events[i:]])
                break
            else:
                self._drop(len(events) - i, "the event buffer is full")
                break
        self._start_flusher()

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        now = time.monotonic()
        if now - self._drop_logged >= 60:
            self._drop_logged = now
            log.error("dropping events: %s (%d dropped so far)", why, self.dropped)

    def _begin_outage(self, exc: BaseException) -> None:
        if self._outage is None:
            self._outage = time.monotonic()
            log.error(
                "event store unavailable, holding events locally until it returns "
                "(event_policy: buffer): %s", exc
            )

    # --- writing held events back -----------------------------------------------------
    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        pause = 0.2
        while self.held:
            try:
                if self._sweeper is not None:
                    # Held by processes that exited (an `omniq enqueue` during the
                    # outage): older than ours, so written first.
                    await self.adopt_orphans()
                await self._write_some()
                pause = 0.2
            except BackendUnavailable:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
        if self._outage is not None:
            took = time.monotonic() - self._outage
            self._outage = None
            log.warning("event store reachable again after %.0f s: held events written", took)

    async def _write_some(self) -> None:
        batch = list(self._memory)[:BATCH] if self._memory else []
        from_memory = bool(batch)
        if not batch and self._spill is not None:
            batch = self._spill.peek(BATCH)
        if not batch:
            return
        try:
            await self.inner.append_many(batch)
        except BackendError as exc:  # refused (not unreachable): never block the rest
            if isinstance(exc, BackendUnavailable):
                raise
            self._drop(len(batch), f"the event store refused them: {exc}")
        if from_memory:
            for _ in batch:
                self._memory.popleft()
        elif self._spill is not None:
            self._spill.consume(len(batch))

    # --- spill files of processes that are gone ------------------------------------
    def start_sweeping(self) -> None:
        """Write the spill files of exited processes from now on (what a worker does)."""
        if self._spill is not None and (self._sweeper is None or self._sweeper.done()):
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        while True:
            if not self.held:
                with contextlib.suppress(BackendUnavailable):
                    await self.adopt_orphans()
            await asyncio.sleep(SWEEP_EVERY)

    async def adopt_orphans(self) -> int:
        """Write the spill files of exited processes to the store; how many events."""
        if self._spill is None or not self._spill.folder.is_dir():
            return 0
        total = 0
        for path in sorted(self._spill.folder.glob(f"*{_SUFFIX}")):
            if path == self._spill.path:
                continue
            total += await self._adopt(path)
        return total

    async def _adopt(self, path: Path) -> int:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, after the lock is released
        except FileNotFoundError:
            return 0
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0  # its writer still lives: it writes them itself
            events = [e for line in f if (e := _decoded_line(line)) is not None]
            for i in range(0, len(events), BATCH):
                await self.inner.append_many(events[i : i + BATCH])
            os.unlink(path)
        if events:
            log.info("wrote %d events held by an exited process (%s)", len(events), path.name)
        return len(events)

    # --- reads and lifecycle go to the real store -------------------------------------
    async def open(self) -> None:
        """Open the real store; unreachable now is an outage like any other (the store
        connects again on its next call), not a reason to stop."""
        try:
            await self.inner.open()
        except BackendUnavailable as exc:
            self._begin_outage(exc)

    async def close(self) -> None:
        for task in (self._sweeper,):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self._flush_before_close()
        if self._spill is not None:
            self._spill.close()
        await self.inner.close()

    async def _flush_before_close(self) -> None:
        """One bounded last try to write what is held; the rest goes to the spill file."""
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await flusher
        with contextlib.suppress(TimeoutError, BackendUnavailable):
            async with asyncio.timeout(FLUSH_AT_CLOSE):
                while self.held:
                    await self._write_some()
        if not self.held:
            return
        if self._spill is None:
            self._drop(len(self._memory), "the process ends and has no spill directory")
            self._memory.clear()
            return
        if self._memory:
            self._spill.rewrite([encode_event(e) for e in self._memory])
            self._memory.clear()
        log.warning(
            "the event store is unavailable: %d events are kept in %s and will be "
            "written by a worker when it returns", self.held, self._spill.path
        )

    async def get(self, task_id: str) -> list[TaskEvent]:
        return await self.inner.get(task_id)

    async def read(self, after: str | None, limit: int) -> list[tuple[str, TaskEvent]]:
        return await self.inner.read(after, limit)

    async def latest(self, limit: int, before: str | None = None) -> list[tuple[str, TaskEvent]]:
        return await self.inner.latest(limit, before)

    async def last_cursor(self) -> str | None:
        return await self.inner.last_cursor()

    async def wait_new(self, after: str | None, timeout: float) -> None:
        await self.inner.wait_new(after, timeout)

    async def cleanup(self, before: datetime) -> int:
        return await self.inner.cleanup(before)

    def __getattr__(self, name: str) -> Any:
        # Backend-specific extras (tests, tools) still reach the real store.
        return getattr(self.inner, name)
