"""Results and events on any filesystem: a local directory or an fsspec URL (S3, GCS,
Azure, memory://). Every object is written once and never appended to or renamed on
object stores, so the same layout works everywhere::

    results/<sid[:7]>/<sid>.json                one result (UUIDv7 ids: ~17 min per prefix)
    results-index/<YYYYMMDDHH>/<exp_us>~<fin_us>~<sid>   empty marker, by expiry hour
    results-index/never/<9..9>~<fin_us>~<sid>   the marker of a result without expiry
    events/log/<YYYYMMDD>/<HHMM>/<stem>.json    the global, time-ordered index (read/tail)
    events/tasks/<sid>/<eid>.json               the same event again (and its stem), for get
    .tmp/                                       local only: files being written

TTL cleanup lists only the index buckets whose hour has come and reads only the
results they name; a sweep by finish time lists the whole index but reads only the
old results. Markers a result outgrew (stored again with another expiry) are
dropped when a sweep reaches them.

`sid` is the task id when it is a plain file name, else "=" + a hash of it (`eid`
likewise for an event id). An event `stem` is `<us>~<writer>~<seq>~<sid>~<eid>`: a
time in microseconds, a random id of the writing Backend and its counter. The stem
is the cursor; stems sort as strings. (Events stored before event ids have stems
without `~<eid>` and per-task copies named `<stem>.json`; both still read.)

Stored once: a result is created only where none is (or an expired one is), so the
first final outcome wins; an event's per-task copy, named by its id, is created only
where none is, and an append that finds one under another stem removes its own log
copy. Exclusive creates are link() locally and conditional PUTs on S3 (If-None-Match,
and If-Match to replace an expired result); on other filesystems they are atomic
within one process only (see files._RemoteFiles.create).

Ordering guarantee for events: one order everywhere (read, tail and get), by stem.
The time is the append time, taken just before the write and strictly increasing
per writer, so each writer's events keep their append order and events of
different writers are ordered by their append times. An event whose own timestamp
is more than a minute away from its append time (back-dated) is filed under that
timestamp instead, so that cleanup by age finds it; followers past that point do
not see it. Two writers in the same microsecond are ordered by writer id, which is
deterministic, so a cursor always resumes at the same place. A follower can still
miss an event of writer A if it reads while A's write is in flight and a later
event of writer B is already visible: that window is one local write (with fsync,
about a millisecond) or one object-store PUT. `get(task_id)` lists a per-task prefix
and sees every stored event of that task.

Atomicity: local writes go to `.tmp/`, are fsynced and renamed (or linked) into place
(then the directory is fsynced); object stores get one PUT per object, which readers
see whole or not at all. The log copy of an event is written before the per-task copy, so
cleanup, which walks the log, can always find both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from omniq.errors import BackendError, CorruptRecord, OmniQError
from omniq.models import TaskEvent, TaskResult
from omniq.serialization import (
    decode_event,
    decode_result,
    dumps,
    encode_result,
    event_to_dict,
    loads,
)
from omniq.storage import PollingBackoff, poll_for_result

from .common import RACES, now_us, sid_of, us, utc
from .files import Files, Found

if TYPE_CHECKING:
    from .backend import FileBackend

T = TypeVar("T")

_STEM = re.compile(r"\d{17}~[0-9a-f]{12}~\d{10}~[A-Za-z0-9_.=-]+(~[A-Za-z0-9_.=-]+)?")


# --- results -----------------------------------------------------------------


_NEVER = "9" * 17  # the expiry field of a result that never expires
_BATCH = 1000  # objects read or deleted per round in sweeps


def _result_rel(name: str) -> str:
    return f"results/{name[:7]}/{name}.json"


def _index_rel(result: TaskResult) -> str:
    """The result's index marker: bucketed by expiry hour, named by expiry and finish time."""
    finished = f"{us(result.finished_at):017d}"
    if result.expires_at is None:
        return f"results-index/never/{_NEVER}~{finished}~{sid_of(result.task_id)}"
    expires = us(result.expires_at)
    bucket = f"{utc(expires):%Y%m%d%H}"
    return f"results-index/{bucket}/{expires:017d}~{finished}~{sid_of(result.task_id)}"


def _replaceable(found: Found) -> bool:
    """An expired result does not block a new one; nor does one that does not decode
    (an operator's bad write), which no reader could use."""
    try:
        return decode_result(found.data).is_expired()
    except CorruptRecord:
        return True


def store_result(files: Files, result: TaskResult) -> bool:
    """Create the result unless an unexpired one is there: the first outcome wins."""
    rel, data = _result_rel(sid_of(result.task_id)), encode_result(result)
    marker = _index_rel(result)
    # The marker first: every stored result is findable by cleanup.
    files.mark(marker)
    for _ in range(RACES):
        found = files.create(rel, data)
        if found is None:
            return True
        if not _replaceable(found):
            _drop_marker(files, marker, found)
            return False
        if files.replace(rel, found, data):
            return True
    raise BackendError(f"file store: could not store the result of {result.task_id}")


def _drop_marker(files: Files, marker: str, kept: Found) -> None:
    """Remove the marker of a result that lost, unless the winner's has the same name."""
    with contextlib.suppress(CorruptRecord):
        if _index_rel(decode_result(kept.data)) == marker:
            return
    files.delete([marker])


def get_result(files: Files, task_id: str) -> TaskResult | None:
    data = files.read(_result_rel(sid_of(task_id)))
    return None if data is None else decode_result(data)


def get_results(files: Files, task_ids: Sequence[str]) -> dict[str, TaskResult]:
    """Several results in one read_all: on object stores the GETs go out concurrently."""
    rels = {_result_rel(sid_of(task_id)): task_id for task_id in task_ids}
    stored = files.read_all(list(rels))
    return {rels[rel]: decode_result(data) for rel, data in stored.items()}


def _delete_result(files: Files, task_id: str) -> bool:
    result = get_result(files, task_id)
    if result is not None:
        files.delete([_result_rel(sid_of(task_id)), _index_rel(result)])
    return result is not None


@dataclass(frozen=True)
class _Marker:
    rel: str
    expires_us: int
    finished_us: int
    sid: str


def _markers(files: Files, last_bucket: str | None = None) -> Iterator[_Marker]:
    """Index markers in buckets up to `last_bucket` (all when None), oldest expiry first."""
    for bucket in files.names("results-index"):
        if last_bucket is not None and bucket > last_bucket:
            return
        for name in files.names(f"results-index/{bucket}"):
            parts = name.split("~", 2)
            if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
                rel = f"results-index/{bucket}/{name}"
                yield _Marker(rel, int(parts[0]), int(parts[1]), parts[2])


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), _BATCH):
        yield items[i : i + _BATCH]


def _settle(
    files: Files, candidates: Sequence[_Marker], doomed: Callable[[TaskResult], bool]
) -> int:
    """Delete the candidates' results that are `doomed`; drop markers that went stale."""
    count = 0
    for part in _chunks(candidates):
        stored = files.read_all([_result_rel(m.sid) for m in part])
        gone: list[str] = []
        for marker in part:
            data = stored.get(_result_rel(marker.sid))
            result = None if data is None else decode_result(data)
            if result is not None and doomed(result) and _result_rel(marker.sid) not in gone:
                gone += [_result_rel(marker.sid), _index_rel(result)]
                count += 1
            # A marker left by an earlier store of the same task, or by a deleted result.
            if result is None or _index_rel(result) != marker.rel:
                gone.append(marker.rel)
        files.delete(gone)
    return count


def _cleanup_results(files: Files, now: int, finished_before_us: int | None) -> int:
    hour = f"{utc(now):%Y%m%d%H}"
    due = [m for m in _markers(files, hour) if m.expires_us <= now]
    count = _settle(files, due, lambda r: r.is_expired(utc(now)))
    if finished_before_us is not None:
        # A sweep by finish time lists every marker, but reads only the old results.
        old = [m for m in _markers(files) if m.finished_us < finished_before_us]
        count += _settle(files, old, lambda r: us(r.finished_at) < finished_before_us)
    files.prune([f"results-index/{b}" for b in files.names("results-index")])
    return count


# --- events ------------------------------------------------------------------

_LOG = "events/log"
_STAMP_SLACK_US = 60_000_000  # events stamped within a minute of their append sort by append
_RECENT_IDS = 4096  # event ids whose name a writer remembers for appends sent again


def _log_rel(stem: str) -> str:
    when = utc(int(stem[:17]))
    return f"{_LOG}/{when:%Y%m%d}/{when:%H%M}/{stem}.json"


def _task_rel(stem: str) -> str:
    """The per-task copy: named by the event id, so there is one per id (events stored
    before ids were named by their cursor, which has no id part)."""
    parts = stem.split("~")
    if len(parts) == 5:
        return f"events/tasks/{parts[3]}/{parts[4]}.json"
    return f"events/tasks/{parts[3]}/{stem}.json"


def _task_copy(event: TaskEvent, stem: str) -> bytes:
    # The cursor rides along: get() orders by it, and a second append of the id tells
    # by it whether the copy there is its own. (The log copy holds the same bytes.)
    return dumps({**event_to_dict(event), "cursor": stem}).encode()


def _copy_cursor(rel: str, data: bytes) -> str:
    name = rel.rsplit("/", 1)[1][: -len(".json")]
    if _STEM.fullmatch(name):
        return name  # stored before event ids: named by its cursor
    with contextlib.suppress(ValueError, AttributeError):
        cursor = loads(data).get("cursor")
        if isinstance(cursor, str):
            return cursor
    return ""


def _check_cursor(cursor: str) -> None:
    if not _STEM.fullmatch(cursor):
        raise ValueError(f"not a file event cursor: {cursor!r}")


def _stems(names: list[str]) -> list[str]:
    return [n[:-5] for n in names if n.endswith(".json")]


def _log_buckets(files: Files, start: str = "", reverse: bool = False) -> Iterator[str]:
    """Minute buckets `YYYYMMDD/HHMM` at or after `start`, oldest first (or newest first)."""
    days = [d for d in files.names(_LOG) if d >= start[:8]]
    for day in reversed(days) if reverse else days:
        minutes = [f"{day}/{m}" for m in files.names(f"{_LOG}/{day}")]
        minutes = [b for b in minutes if b >= start]
        yield from reversed(minutes) if reverse else minutes


def _bucket_of(stem: str) -> str:
    return f"{utc(int(stem[:17])):%Y%m%d/%H%M}"


def _read_stems(files: Files, after: str | None, limit: int) -> list[str]:
    start = "" if after is None else _bucket_of(after)
    found: list[str] = []
    for bucket in _log_buckets(files, start):
        for stem in _stems(files.names(f"{_LOG}/{bucket}")):
            if after is None or stem > after:
                found.append(stem)
                if len(found) >= limit:
                    return found
    return found


def _read_events(files: Files, after: str | None, limit: int) -> list[tuple[str, TaskEvent]]:
    stems = _read_stems(files, after, limit)
    data = files.read_all([_log_rel(s) for s in stems])
    # An event missing here was removed by a concurrent cleanup: skip it.
    return [(s, decode_event(data[rel])) for s in stems if (rel := _log_rel(s)) in data]


def _buckets_up_to(files: Files, last: str) -> Iterator[str]:
    """Minute buckets `YYYYMMDD/HHMM` at or before `last`, newest first."""
    for day in reversed([d for d in files.names(_LOG) if d <= last[:8]]):
        minutes = reversed(files.names(f"{_LOG}/{day}"))
        yield from (b for m in minutes if (b := f"{day}/{m}") <= last)


def _latest_stems(files: Files, before: str | None, limit: int) -> list[str]:
    # A stem's bucket is its time's minute, so every stem < before is in a bucket <= its one.
    last = "99999999/9999" if before is None else _bucket_of(before)
    found: list[str] = []
    for bucket in _buckets_up_to(files, last):
        stems = _stems(files.names(f"{_LOG}/{bucket}"))
        if before is not None:
            stems = [s for s in stems if s < before]
        found = stems[len(found) - limit :] + found
        if len(found) >= limit:
            break
    return found


def _latest_events(
    files: Files, before: str | None, limit: int
) -> list[tuple[str, TaskEvent]]:
    stems = _latest_stems(files, before, limit)
    data = files.read_all([_log_rel(s) for s in stems])
    return [(s, decode_event(data[rel])) for s in stems if (rel := _log_rel(s)) in data]


def _last_stem(files: Files) -> str | None:
    for bucket in _log_buckets(files, reverse=True):
        stems = _stems(files.names(f"{_LOG}/{bucket}"))
        if stems:
            return stems[-1]
    return None


def _task_events(files: Files, task_id: str) -> list[TaskEvent]:
    prefix = f"events/tasks/{sid_of(task_id)}"
    rels = [f"{prefix}/{n}" for n in files.names(prefix) if n.endswith(".json")]
    data = files.read_all(rels)
    ordered = sorted((_copy_cursor(rel, data[rel]), rel) for rel in rels if rel in data)
    events = [decode_event(data[rel]) for _, rel in ordered]
    return [e for e in events if e.task_id == task_id]


def append_events(files: Files, writer: Writer, events: Sequence[TaskEvent]) -> None:
    # Named here, on the store's thread, right before the write: see Writer.
    named = [(writer.stem(e), e) for e in events]
    # The same bytes in the log, then under the task: cleanup walks the log, so a
    # per-task copy never outlives it. The per-task copy is the one-per-id gate. Found
    # under another cursor, the event was stored before (sent again through another
    # Backend): that copy stands and our log copy goes. A follower reading in between
    # may see it twice.
    kept = files.publish_all(
        [(_log_rel(stem), _task_rel(stem), _task_copy(e, stem)) for stem, e in named]
    )
    if kept:
        files.delete([_log_rel(stem) for stem, _ in named if _task_rel(stem) in kept])


def _expired_stems(files: Files, before_us: int) -> Iterator[tuple[str, list[str]]]:
    """(bucket, its stems older than `before_us`) for each bucket up to that minute."""
    last = f"{utc(before_us):%Y%m%d/%H%M}"
    for bucket in _log_buckets(files):
        if bucket > last:
            return
        stems = _stems(files.names(f"{_LOG}/{bucket}"))
        yield bucket, [s for s in stems if int(s[:17]) < before_us]


def _cleanup_events(files: Files, before_us: int) -> int:
    count = 0
    for bucket, stems in _expired_stems(files, before_us):
        files.delete([_task_rel(s) for s in stems])
        files.delete([_log_rel(s) for s in stems])
        task_dirs = sorted({_task_rel(s).rsplit("/", 1)[0] for s in stems})
        files.prune([*task_dirs, f"{_LOG}/{bucket}", f"{_LOG}/{bucket[:8]}"])
        count += len(stems)
    return count


class Writer:
    """Names a Backend's events: when, a random writer id, a counter (new after a fork),
    the task and the event id. An event appended again through the same Backend (its
    first append failed, or its reply was lost) gets the name it got the first time, so
    its log copy is written over itself rather than twice."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0
        self._token = ""
        self._seq = 0
        self._last_us = 0
        self._recent: OrderedDict[str, str] = OrderedDict()  # event id -> its stem

    def stem(self, event: TaskEvent) -> str:
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._token, self._seq = os.getpid(), secrets.token_hex(6), 0
                self._recent.clear()
            stem = self._recent.get(event.id)
            if stem is None:
                stem = self._recent[event.id] = self._new_stem(event)
                if len(self._recent) > _RECENT_IDS:
                    self._recent.popitem(last=False)
            return stem

    def _new_stem(self, event: TaskEvent) -> str:
        self._seq += 1
        # Append time, strictly increasing per writer, keeps append order and leaves
        # followers only the instant of the write itself to miss; an event stamped
        # far from now (back-dated) keeps its own time so cleanup by age finds it.
        self._last_us = max(now_us(), self._last_us + 1)
        stamped = us(event.timestamp)
        when = self._last_us if abs(self._last_us - stamped) <= _STAMP_SLACK_US else stamped
        ids = f"{sid_of(event.task_id)}~{sid_of(event.id)}"
        return f"{when:017d}~{self._token}~{self._seq:010d}~{ids}"



# --- store handles -------------------------------------------------------------


def _backend_at(
    base_dir: str | os.PathLike[str], storage_options: Mapping[str, Any] | None, durable: bool
) -> FileBackend:
    from .backend import backend_at  # (that module builds these stores: imported on use)

    return backend_at(base_dir, storage_options, durable)


class _Handle:
    """A store of a FileBackend: its calls run on the Backend's thread for its role."""

    backend: FileBackend
    _lane = ""

    def translate(self, exc: BaseException) -> OmniQError | None:
        return self.backend.translate(exc)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.backend.on_files(self._lane, fn, *args)

    async def open(self) -> None:
        self.backend.attach(self)
        await self._call(lambda files: None)

    async def close(self) -> None:
        await self.backend.detach(self)


class FileResultStorage(_Handle):
    """Results as one JSON object each; `wait` polls, woken at once by this process."""

    _lane = "results"

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        *,
        durable: bool = True,
    ) -> None:
        self.backend = _backend_at(base_dir, storage_options, durable)

    @classmethod
    def on(cls, backend: FileBackend) -> FileResultStorage:
        store = cls.__new__(cls)
        store.backend = backend
        return store

    async def store(self, result: TaskResult) -> bool:
        stored = await self._call(store_result, result)
        if stored:
            self.backend.signal.notify(result.task_id)
        return stored

    async def get(self, task_id: str) -> TaskResult | None:
        result = await self._call(get_result, task_id)
        if result is None or result.is_expired():
            return None
        return result

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskResult]:
        if not task_ids:
            return {}
        found = await self._call(get_results, list(dict.fromkeys(task_ids)))
        return {task_id: r for task_id, r in found.items() if not r.is_expired()}

    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        return await poll_for_result(self.get, self.backend.signal, task_id, timeout)

    async def delete(self, task_id: str) -> bool:
        return await self._call(_delete_result, task_id)

    async def cleanup(self, now: datetime, finished_before: datetime | None = None) -> int:
        before = None if finished_before is None else us(finished_before)
        return await self._call(_cleanup_results, us(now), before)


class FileEventStorage(_Handle):
    """Events as small immutable objects: a time-bucketed log plus a per-task copy."""

    _lane = "events"

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        *,
        durable: bool = True,
        poll_interval: float = 0.5,
    ) -> None:
        self.backend = _backend_at(base_dir, storage_options, durable)
        self._poll_interval = poll_interval

    @classmethod
    def on(cls, backend: FileBackend, poll_interval: float = 0.5) -> FileEventStorage:
        store = cls.__new__(cls)
        store.backend, store._poll_interval = backend, poll_interval
        return store

    async def append(self, event: TaskEvent) -> None:
        await self.append_many([event])

    async def append_many(self, events: Sequence[TaskEvent]) -> None:
        if not events:
            return
        await self._call(append_events, self.backend.writer, list(events))
        self.backend.signal.notify("events")

    async def get(self, task_id: str) -> list[TaskEvent]:
        return await self._call(_task_events, task_id)

    async def read(self, after: str | None, limit: int) -> list[tuple[str, TaskEvent]]:
        if after is not None:
            _check_cursor(after)
        if limit <= 0:
            return []
        return await self._call(_read_events, after, limit)

    async def latest(self, limit: int, before: str | None = None) -> list[tuple[str, TaskEvent]]:
        if before is not None:
            _check_cursor(before)
        if limit <= 0:
            return []
        return await self._call(_latest_events, before, limit)

    async def last_cursor(self) -> str | None:
        return await self._call(_last_stem)

    async def wait_new(self, after: str | None, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        backoff = PollingBackoff(first=0.01, most=self._poll_interval)
        while True:
            last = await self.last_cursor()
            if last is not None and (after is None or last > after):
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await self.backend.signal.wait("events", min(backoff.next(), remaining))

    async def cleanup(self, before: datetime) -> int:
        return await self._call(_cleanup_events, us(before))
