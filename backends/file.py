"""File stores: results and events on any fsspec filesystem, a maildir-style queue on local disk.

Layout under `base_dir` (a local path or an fsspec URL such as s3://bucket/prefix).
Every object is written once and never appended to or renamed on object stores,
so the same layout works on S3, GCS, Azure and memory://::

    results/<sid[:7]>/<sid>.json                one result (UUIDv7 ids: ~17 min per prefix)
    results-index/<YYYYMMDDHH>/<exp_us>~<fin_us>~<sid>   empty marker, by expiry hour
    results-index/never/<9..9>~<fin_us>~<sid>   the marker of a result without expiry
    events/log/<YYYYMMDD>/<HHMM>/<stem>.json    the global, time-ordered index (read/tail)
    events/tasks/<sid>/<eid>.json               the same event again (and its stem), for get
    queue/...                                   FileQueue, local POSIX only (see below)
    .tmp/                                       local only: files being written

TTL cleanup lists only the index buckets whose hour has come and reads only the
results they name; a sweep by finish time lists the whole index but reads only the
old results. Markers a result outgrew (stored again with another expiry) are
dropped when a sweep reaches them.

`sid` is the task id when it is a plain file name, else "=" + a hash of it (`eid`
likewise for an event id). An event `stem` is `<us>~<writer>~<seq>~<sid>~<eid>`: a
time in microseconds, a random id of the writing store handle and its counter. The
stem is the cursor; stems sort as strings. (Events stored before event ids have
stems without `~<eid>` and per-task copies named `<stem>.json`; both still read.)

Stored once: a result is created only where none is (or an expired one is), so the
first final outcome wins; an event's per-task copy, named by its id, is created only
where none is, and an append that finds one under another stem removes its own log
copy. Exclusive creates are link() locally and conditional PUTs on S3 (If-None-Match,
and If-Match to replace an expired result); on other filesystems they are atomic
within one process only (see _RemoteFiles.create).

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
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from omniq.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    CorruptRecord,
    MissingDependency,
    OmniQError,
    redact,
)
from omniq.models import (
    Delivery,
    QueueStats,
    Task,
    TaskEvent,
    TaskResult,
    WorkerInfo,
    check_queue_name,
)
from omniq.registry import Role, require
from omniq.serialization import (
    decode_event,
    decode_result,
    decode_task_or_placeholder,
    decode_worker,
    dumps,
    encode_event,
    encode_result,
    encode_task,
    encode_worker,
    event_to_dict,
    loads,
)
from omniq.storage import BlockingRunner, LocalSignal, PollingBackoff, poll_for_result

T = TypeVar("T")
_log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
_STEM = re.compile(r"\d{17}~[0-9a-f]{12}~\d{10}~[A-Za-z0-9_.=-]+(~[A-Za-z0-9_.=-]+)?")
_TMP_MAX_AGE = 3600.0  # seconds before a leftover temp file counts as garbage
_DRIVER_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "azure",
                   "google", "fsspec")
_LOCAL_PROTOCOLS = ("file", "local")
_RACES = 8  # tries of a create or replace that keeps losing to concurrent changes
_create_lock = threading.Lock()  # see _RemoteFiles.create


# --- names and times ---------------------------------------------------------


def _sid(key: str) -> str:
    """A file-name-safe form of a task or worker id (hashed when it is not one already)."""
    if _SAFE_NAME.fullmatch(key):
        return key
    return "=" + hashlib.sha256(key.encode()).hexdigest()[:40]


def _us(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return max(0, (value - _EPOCH) // _US)


def _now_us() -> int:
    return time.time_ns() // 1000


def _utc(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _local_path(base_dir: str | os.PathLike[str]) -> str | None:
    """The local directory `base_dir` names, or None for any other filesystem."""
    text = os.fspath(base_dir)
    if "://" in text:
        protocol, _, rest = text.partition("://")
        if protocol.lower() not in _LOCAL_PROTOCOLS:  # s3, memory, or a chain a::b
            return None
        text = rest
    return os.path.abspath(os.path.expanduser(text))


# --- filesystem access -------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    """What an exclusive create found in its way: its bytes and, where the store has
    one, a version tag to replace exactly that object (an S3 ETag)."""

    data: bytes
    tag: str | None = None


class _Files(Protocol):
    """The few primitives the stores need; paths are relative to the store root.

    `create` writes only where nothing is: None when it wrote (or found these very
    bytes, its own write sent twice), else what is there. `replace` puts new bytes in
    place of what `create` found, only if that is still there (a compare-and-swap).
    """

    def write(self, rel: str, data: bytes) -> None: ...
    def write_all(self, items: Mapping[str, bytes]) -> None: ...
    def create(self, rel: str, data: bytes) -> _Found | None: ...
    def create_all(self, items: Mapping[str, bytes]) -> dict[str, _Found]: ...
    def replace(self, rel: str, old: _Found, data: bytes) -> bool: ...
    def read(self, rel: str) -> bytes | None: ...
    def read_all(self, rels: Sequence[str]) -> dict[str, bytes]: ...
    def names(self, rel: str) -> list[str]: ...
    def delete(self, rels: Sequence[str]) -> None: ...
    def prune(self, rels: Sequence[str]) -> None: ...


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_quiet(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write_tmp(tmp_dir: str, data: bytes, durable: bool) -> str:
    path = os.path.join(tmp_dir, secrets.token_hex(8))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _sweep_tmp(tmp_dir: str) -> None:
    """Drop temp files a killed writer left behind (old enough to be nobody's)."""
    cutoff = time.time() - _TMP_MAX_AGE
    with contextlib.suppress(FileNotFoundError), os.scandir(tmp_dir) as it:
        for entry in it:
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)


class _LocalFiles:
    """Plain os calls: write to .tmp, fsync, rename into place, fsync the directory."""

    def __init__(self, root: str, durable: bool) -> None:
        self.root = root
        self.durable = durable
        self.tmp = os.path.join(root, ".tmp")
        os.makedirs(self.tmp, exist_ok=True)
        _sweep_tmp(self.tmp)

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def write(self, rel: str, data: bytes) -> None:
        dest = self._path(rel)
        tmp = _write_tmp(self.tmp, data, self.durable)
        try:
            os.replace(tmp, dest)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(tmp, dest)
        if self.durable:
            _fsync_dir(os.path.dirname(dest))

    def write_all(self, items: Mapping[str, bytes]) -> None:
        for rel, data in items.items():
            self.write(rel, data)

    def create(self, rel: str, data: bytes) -> _Found | None:
        # link() of a fully written file: it appears whole, and only if the name is free.
        tmp = _write_tmp(self.tmp, data, self.durable)
        try:
            return self._link(tmp, self._path(rel), data)
        finally:
            _unlink_quiet(tmp)

    def _link(self, tmp: str, dest: str, data: bytes) -> _Found | None:
        for _ in range(_RACES):
            try:
                os.link(tmp, dest)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                continue
            except FileExistsError:
                there = _read_quiet(dest)
                if there is None:
                    continue  # removed while we looked: try again
                return None if there == data else _Found(there)
            if self.durable:
                _fsync_dir(os.path.dirname(dest))
            return None
        raise BackendError(f"file store: could not create {dest}: it keeps changing")

    def create_all(self, items: Mapping[str, bytes]) -> dict[str, _Found]:
        found = {rel: self.create(rel, data) for rel, data in items.items()}
        return {rel: there for rel, there in found.items() if there is not None}

    def replace(self, rel: str, old: _Found, data: bytes) -> bool:
        dest = self._path(rel)
        grave = os.path.join(self.tmp, secrets.token_hex(8))
        try:
            os.rename(dest, grave)  # of all processes replacing it, one gets the file
        except FileNotFoundError:
            return False
        if _read_quiet(grave) != old.data:
            # Replaced since we read it: put that one back. A third writer creating the
            # name in the microseconds between could still win over it (a documented race
            # that needs an expired result and three concurrent writers).
            with contextlib.suppress(FileExistsError):
                os.link(grave, dest)
            os.unlink(grave)
            return False
        os.unlink(grave)
        return self.create(rel, data) is None

    def read(self, rel: str) -> bytes | None:
        return _read_quiet(self._path(rel))

    def read_all(self, rels: Sequence[str]) -> dict[str, bytes]:
        return {rel: data for rel in rels if (data := self.read(rel)) is not None}

    def names(self, rel: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self._path(rel)) if not n.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, rels: Sequence[str]) -> None:
        for rel in rels:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(rel))

    def prune(self, rels: Sequence[str]) -> None:
        for rel in rels:
            with contextlib.suppress(OSError):  # not empty (a writer got there first) or gone
                os.rmdir(self._path(rel))


class _RemoteFiles:
    """fsspec calls: one PUT per object, listings never served from a cache."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        # s3fs asks for an object's size (a HEAD, plus a LIST when it is missing) before
        # each GET unless told to read it in one piece; our objects are small.
        self._get_options = {"max_concurrency": 1} if type(fs).__name__ == "S3FileSystem" else {}

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def write(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(rel), data)

    def write_all(self, items: Mapping[str, bytes]) -> None:
        if items:  # async filesystems upload these concurrently
            self.fs.pipe({self._path(rel): data for rel, data in items.items()})

    # A check and a write under one lock: atomic within this process, which is all of
    # memory://. Other filesystems (GCS, Azure, ...) get no cross-process guarantee
    # from this: two processes may both create (the later write wins). S3 does better.
    def create(self, rel: str, data: bytes) -> _Found | None:
        with _create_lock:
            there = self.read(rel)
            if there is None:
                self.write(rel, data)
                return None
        return None if there == data else _Found(there)

    def create_all(self, items: Mapping[str, bytes]) -> dict[str, _Found]:
        found = {rel: self.create(rel, data) for rel, data in items.items()}
        return {rel: there for rel, there in found.items() if there is not None}

    def replace(self, rel: str, old: _Found, data: bytes) -> bool:
        with _create_lock:
            if self.read(rel) != old.data:
                return False
            self.write(rel, data)
            return True

    def read(self, rel: str) -> bytes | None:
        try:
            data: bytes = self.fs.cat_file(self._path(rel), **self._get_options)
            return data
        except FileNotFoundError:
            return None

    def read_all(self, rels: Sequence[str]) -> dict[str, bytes]:
        if not rels:
            return {}
        paths = {self.fs._strip_protocol(self._path(rel)): rel for rel in rels}
        try:
            found = self.fs.cat(list(paths), on_error="omit", **self._get_options)
        except FileNotFoundError:
            return {}
        return {paths[self.fs._strip_protocol(p)]: data for p, data in found.items()}

    def names(self, rel: str) -> list[str]:
        try:
            listed = self.fs.ls(self._path(rel), detail=False, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = (str(p).rstrip("/").rsplit("/", 1)[-1] for p in listed)
        return sorted(n for n in names if n and not n.startswith("."))

    def delete(self, rels: Sequence[str]) -> None:
        paths = [self._path(rel) for rel in rels]
        if not paths:
            return
        try:
            self.fs.rm(paths)  # bulk delete where the store has one
        except FileNotFoundError:
            for path in paths:  # some filesystems refuse a batch with a missing member
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)

    def prune(self, rels: Sequence[str]) -> None:
        return None  # object stores have no directories to remove


class _S3Files(_RemoteFiles):
    """S3's conditional writes: PUT If-None-Match: * creates, If-Match: <ETag> replaces.

    Both are atomic on the server, so they hold across processes and hosts. A PUT the
    client library sends again (its reply was lost) fails its condition against our own
    first copy: `create` then finds its own bytes and reports success.
    """

    def create(self, rel: str, data: bytes) -> _Found | None:
        path = self._path(rel)
        for _ in range(_RACES):
            try:
                self.fs.pipe_file(path, data, IfNoneMatch="*")
                return None
            except OSError as exc:
                if not _condition_failed(exc):
                    raise
            found = self._found(path)
            if found is not None:
                return None if found.data == data else found
        raise BackendError(f"file store: could not create {path}: it keeps changing")

    def create_all(self, items: Mapping[str, bytes]) -> dict[str, _Found]:
        if not items:
            return {}
        paths = {self._path(rel): data for rel, data in items.items()}
        try:
            self.fs.pipe(paths, IfNoneMatch="*")  # concurrently; the usual case
            return {}
        except OSError as exc:
            if not _condition_failed(exc):
                raise
        # Some were there: one by one (ours from the batch read back as ours).
        return super().create_all(items)

    def _found(self, path: str) -> _Found | None:
        # The tag first: if the object changes before the read, a replace by this tag fails.
        try:
            tag = self.fs.info(path).get("ETag")
            data: bytes = self.fs.cat_file(path, **self._get_options)
        except FileNotFoundError:
            return None
        return _Found(data, tag)

    def replace(self, rel: str, old: _Found, data: bytes) -> bool:
        if old.tag is None:
            return False
        try:
            self.fs.pipe_file(self._path(rel), data, IfMatch=old.tag)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if not _condition_failed(exc):
                raise
            return False
        return True


def _condition_failed(exc: BaseException) -> bool:
    """S3 refused a conditional write: 412 (the condition is false) or 409 (another
    conditional write of the key is in flight)."""
    if isinstance(exc, FileExistsError):
        return True
    response = getattr(exc.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def _connect(base_dir: str, storage_options: Mapping[str, Any], durable: bool) -> _Files:
    local = _local_path(base_dir)
    if local is not None:
        return _LocalFiles(local, durable)
    fsspec = require("fsspec", "s3")
    options = {"use_listings_cache": False, "skip_instance_cache": True, **storage_options}
    try:
        fs, root = fsspec.core.url_to_fs(base_dir, **options)
    except ImportError as exc:  # the filesystem's own package (s3fs, gcsfs, adlfs) is missing
        raise MissingDependency(
            f"the file backend cannot open {redact(base_dir)!r}: {exc} "
            "(for S3: pip install 'omniq[s3]')"
        ) from exc
    if type(fs).__name__ == "LocalFileSystem":
        return _LocalFiles(os.path.abspath(root), durable)
    if type(fs).__name__ == "S3FileSystem":
        return _S3Files(fs, root)
    return _RemoteFiles(fs, root)


def _is_driver_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError | json.JSONDecodeError | UnicodeDecodeError):
        return True
    module = type(exc).__module__ or ""
    return module.split(".", 1)[0] in _DRIVER_MODULES


def _translate(exc: Exception, where: str) -> OmniQError:
    name = type(exc).__name__
    text = redact(f"file store {where}: {name}: {exc}".splitlines()[0])
    unreachable = ("Connect", "Timeout", "Credentials", "Endpoint", "Auth")
    if isinstance(exc, PermissionError | ConnectionError | TimeoutError) or any(
        word in name for word in unreachable
    ):
        return BackendUnavailable(text)
    return BackendError(text)


async def _run_translated(
    runner: BlockingRunner, where: str, fn: Callable[..., T], *args: Any
) -> T:
    try:
        return await runner.run(fn, *args)
    except OmniQError:
        raise
    except Exception as exc:
        if not _is_driver_error(exc):
            raise
        raise _translate(exc, where) from exc


_signals: dict[str, LocalSignal] = {}
_signals_lock = threading.Lock()


def _signal_for(key: str) -> LocalSignal:
    """One signal per store location, so every handle in this process wakes together."""
    with _signals_lock:
        return _signals.setdefault(key, LocalSignal())


def _options(role: str, options: Mapping[str, Any]) -> dict[str, Any]:
    known = {"durable"} if role == "results" else {"durable", "poll_interval"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"unknown file {role} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return dict(options)


class _FileStore:
    """Shared plumbing: a blocking thread, the filesystem opened on it, error translation."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None,
        durable: bool,
        role: str,
    ) -> None:
        self._base = os.fspath(base_dir)
        self._storage_options = dict(storage_options or {})
        self._durable = durable
        self._runner = BlockingRunner(f"omniq-file-{role}")
        self._files: _Files | None = None
        self._pid = os.getpid()
        local = _local_path(self._base)
        self._signal = _signal_for(local or self._base)

    def _ensure(self) -> _Files:
        # A forked child must not reuse the parent's fsspec client (its loop thread is gone).
        if self._files is None or self._pid != os.getpid():
            self._files = _connect(self._base, self._storage_options, self._durable)
            self._pid = os.getpid()
        return self._files

    def _in_thread(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        return fn(self._ensure(), *args)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await _run_translated(self._runner, self._base, self._in_thread, fn, args)

    async def open(self) -> None:
        await self._call(lambda files: None)

    async def close(self) -> None:
        runner = self._runner
        await asyncio.get_running_loop().run_in_executor(None, runner.shutdown)
        self._files = None


# --- results -----------------------------------------------------------------


_NEVER = "9" * 17  # the expiry field of a result that never expires
_BATCH = 1000  # objects read or deleted per round in sweeps


def _result_rel(sid: str) -> str:
    return f"results/{sid[:7]}/{sid}.json"


def _index_rel(result: TaskResult) -> str:
    """The result's index marker: bucketed by expiry hour, named by expiry and finish time."""
    finished = f"{_us(result.finished_at):017d}"
    if result.expires_at is None:
        return f"results-index/never/{_NEVER}~{finished}~{_sid(result.task_id)}"
    expires = _us(result.expires_at)
    bucket = f"{_utc(expires):%Y%m%d%H}"
    return f"results-index/{bucket}/{expires:017d}~{finished}~{_sid(result.task_id)}"


def _replaceable(found: _Found) -> bool:
    """An expired result does not block a new one; nor does one that does not decode
    (an operator's bad write), which no reader could use."""
    try:
        return decode_result(found.data).is_expired()
    except CorruptRecord:
        return True


def _store_result(files: _Files, result: TaskResult) -> bool:
    """Create the result unless an unexpired one is there: the first outcome wins."""
    rel, data, marker = _result_rel(_sid(result.task_id)), encode_result(result), _index_rel(result)
    # The marker first: every stored result is findable by cleanup.
    files.write(marker, b"")
    for _ in range(_RACES):
        found = files.create(rel, data)
        if found is None:
            return True
        if not _replaceable(found):
            _drop_marker(files, marker, found)
            return False
        if files.replace(rel, found, data):
            return True
    raise BackendError(f"file store: could not store the result of {result.task_id}")


def _drop_marker(files: _Files, marker: str, kept: _Found) -> None:
    """Remove the marker of a result that lost, unless the winner's has the same name."""
    with contextlib.suppress(CorruptRecord):
        if _index_rel(decode_result(kept.data)) == marker:
            return
    files.delete([marker])


def _get_result(files: _Files, task_id: str) -> TaskResult | None:
    data = files.read(_result_rel(_sid(task_id)))
    return None if data is None else decode_result(data)


def _delete_result(files: _Files, task_id: str) -> bool:
    result = _get_result(files, task_id)
    if result is not None:
        files.delete([_result_rel(_sid(task_id)), _index_rel(result)])
    return result is not None


@dataclass(frozen=True)
class _Marker:
    rel: str
    expires_us: int
    finished_us: int
    sid: str


def _markers(files: _Files, last_bucket: str | None = None) -> Iterator[_Marker]:
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
    files: _Files, candidates: Sequence[_Marker], doomed: Callable[[TaskResult], bool]
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


def _cleanup_results(files: _Files, now_us: int, finished_before_us: int | None) -> int:
    hour = f"{_utc(now_us):%Y%m%d%H}"
    due = [m for m in _markers(files, hour) if m.expires_us <= now_us]
    count = _settle(files, due, lambda r: r.is_expired(_utc(now_us)))
    if finished_before_us is not None:
        # A sweep by finish time lists every marker, but reads only the old results.
        old = [m for m in _markers(files) if m.finished_us < finished_before_us]
        count += _settle(files, old, lambda r: _us(r.finished_at) < finished_before_us)
    files.prune([f"results-index/{b}" for b in files.names("results-index")])
    return count


class FileResultStorage(_FileStore):
    """Results as one JSON object each; `wait` polls, woken at once by this process."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        *,
        durable: bool = True,
    ) -> None:
        super().__init__(base_dir, storage_options, durable, "results")

    async def store(self, result: TaskResult) -> bool:
        stored = await self._call(_store_result, result)
        if stored:
            self._signal.notify(result.task_id)
        return stored

    async def get(self, task_id: str) -> TaskResult | None:
        result = await self._call(_get_result, task_id)
        if result is None or result.is_expired():
            return None
        return result

    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        return await poll_for_result(self.get, self._signal, task_id, timeout)

    async def delete(self, task_id: str) -> bool:
        return await self._call(_delete_result, task_id)

    async def cleanup(self, now: datetime, finished_before: datetime | None = None) -> int:
        before = None if finished_before is None else _us(finished_before)
        return await self._call(_cleanup_results, _us(now), before)


# --- events ------------------------------------------------------------------

_LOG = "events/log"
_STAMP_SLACK_US = 60_000_000  # events stamped within a minute of their append sort by append
_RECENT_IDS = 4096  # event ids whose name a writer remembers for appends sent again


def _log_rel(stem: str) -> str:
    when = _utc(int(stem[:17]))
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
    # by it whether the copy there is its own.
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


def _log_buckets(files: _Files, start: str = "", reverse: bool = False) -> Iterator[str]:
    """Minute buckets `YYYYMMDD/HHMM` at or after `start`, oldest first (or newest first)."""
    days = [d for d in files.names(_LOG) if d >= start[:8]]
    for day in reversed(days) if reverse else days:
        minutes = [f"{day}/{m}" for m in files.names(f"{_LOG}/{day}")]
        minutes = [b for b in minutes if b >= start]
        yield from reversed(minutes) if reverse else minutes


def _bucket_of(stem: str) -> str:
    return f"{_utc(int(stem[:17])):%Y%m%d/%H%M}"


def _read_stems(files: _Files, after: str | None, limit: int) -> list[str]:
    start = "" if after is None else _bucket_of(after)
    found: list[str] = []
    for bucket in _log_buckets(files, start):
        for stem in _stems(files.names(f"{_LOG}/{bucket}")):
            if after is None or stem > after:
                found.append(stem)
                if len(found) >= limit:
                    return found
    return found


def _read_events(files: _Files, after: str | None, limit: int) -> list[tuple[str, TaskEvent]]:
    stems = _read_stems(files, after, limit)
    data = files.read_all([_log_rel(s) for s in stems])
    # An event missing here was removed by a concurrent cleanup: skip it.
    return [(s, decode_event(data[rel])) for s in stems if (rel := _log_rel(s)) in data]


def _buckets_up_to(files: _Files, last: str) -> Iterator[str]:
    """Minute buckets `YYYYMMDD/HHMM` at or before `last`, newest first."""
    for day in reversed([d for d in files.names(_LOG) if d <= last[:8]]):
        minutes = reversed(files.names(f"{_LOG}/{day}"))
        yield from (b for m in minutes if (b := f"{day}/{m}") <= last)


def _latest_stems(files: _Files, before: str | None, limit: int) -> list[str]:
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
    files: _Files, before: str | None, limit: int
) -> list[tuple[str, TaskEvent]]:
    stems = _latest_stems(files, before, limit)
    data = files.read_all([_log_rel(s) for s in stems])
    return [(s, decode_event(data[rel])) for s in stems if (rel := _log_rel(s)) in data]


def _last_stem(files: _Files) -> str | None:
    for bucket in _log_buckets(files, reverse=True):
        stems = _stems(files.names(f"{_LOG}/{bucket}"))
        if stems:
            return stems[-1]
    return None


def _task_events(files: _Files, task_id: str) -> list[TaskEvent]:
    prefix = f"events/tasks/{_sid(task_id)}"
    rels = [f"{prefix}/{n}" for n in files.names(prefix) if n.endswith(".json")]
    data = files.read_all(rels)
    ordered = sorted((_copy_cursor(rel, data[rel]), rel) for rel in rels if rel in data)
    events = [decode_event(data[rel]) for _, rel in ordered]
    return [e for e in events if e.task_id == task_id]


def _append_events(files: _Files, writer: _Writer, events: Sequence[TaskEvent]) -> None:
    # Named here, on the store's thread, right before the write: see _Writer.
    named = [(writer.stem(e), e) for e in events]
    # The log first: cleanup walks the log, so a per-task copy never outlives it.
    files.write_all({_log_rel(stem): encode_event(e) for stem, e in named})
    # The per-task copy is the one-per-id gate. Found under another cursor, the event
    # was stored before (sent again through another handle): that copy stands and our
    # log copy goes. A follower reading in between may see it twice.
    kept = files.create_all({_task_rel(stem): _task_copy(e, stem) for stem, e in named})
    if kept:
        files.delete([_log_rel(stem) for stem, _ in named if _task_rel(stem) in kept])


def _expired_stems(files: _Files, before_us: int) -> Iterator[tuple[str, list[str]]]:
    """(bucket, its stems older than `before_us`) for each bucket up to that minute."""
    last = f"{_utc(before_us):%Y%m%d/%H%M}"
    for bucket in _log_buckets(files):
        if bucket > last:
            return
        stems = _stems(files.names(f"{_LOG}/{bucket}"))
        yield bucket, [s for s in stems if int(s[:17]) < before_us]


def _cleanup_events(files: _Files, before_us: int) -> int:
    count = 0
    for bucket, stems in _expired_stems(files, before_us):
        files.delete([_task_rel(s) for s in stems])
        files.delete([_log_rel(s) for s in stems])
        task_dirs = sorted({_task_rel(s).rsplit("/", 1)[0] for s in stems})
        files.prune([*task_dirs, f"{_LOG}/{bucket}", f"{_LOG}/{bucket[:8]}"])
        count += len(stems)
    return count


class _Writer:
    """Names this handle's events: when, a random writer id, a counter (new after a fork),
    the task and the event id. An event appended again through this handle (its first
    append failed, or its reply was lost) gets the name it got the first time, so its
    log copy is written over itself rather than twice."""

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
        self._last_us = max(_now_us(), self._last_us + 1)
        stamped = _us(event.timestamp)
        when = self._last_us if abs(self._last_us - stamped) <= _STAMP_SLACK_US else stamped
        ids = f"{_sid(event.task_id)}~{_sid(event.id)}"
        return f"{when:017d}~{self._token}~{self._seq:010d}~{ids}"


class FileEventStorage(_FileStore):
    """Events as small immutable objects: a time-bucketed log plus a per-task copy."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        *,
        durable: bool = True,
        poll_interval: float = 0.5,
    ) -> None:
        super().__init__(base_dir, storage_options, durable, "events")
        self._writer = _Writer()
        self._poll_interval = poll_interval

    async def append(self, event: TaskEvent) -> None:
        await self.append_many([event])

    async def append_many(self, events: Sequence[TaskEvent]) -> None:
        if not events:
            return
        await self._call(_append_events, self._writer, list(events))
        self._signal.notify("events")

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
            await self._signal.wait("events", min(backoff.next(), remaining))

    async def cleanup(self, before: datetime) -> int:
        return await self._call(_cleanup_events, _us(before))


# --- queue -------------------------------------------------------------------
# A maildir on one POSIX filesystem (local or NFS). Every state change is one
# atomic rename, so whoever wins a rename owns the task and losers see ENOENT:
#
#   queue/tmp/<random>                          being written; never visible
#   queue/ready/<queue>/<P>~<T>~<sid>~<n>       waiting; T in the future = scheduled
#   queue/leased/<ms>~<beat>~<token>~<queue>~<ready name>   held by one worker
#   queue/failed/<queue>/<ready name>           dead letters
#   queue/ids/<sid>                             the task id, while it is unfinished or dead
#   queue/unique/<sha256(key)>                  the id of the unfinished task holding the key
#   queue/held/<sha256(key)>                    a finished task's id; mtime = held until
#   queue/workers/<sid>.json                    mtime = the worker's expiry
#
# P = 10**9 - priority (so higher runs first), T = ready time in microseconds
# (enqueue time, ETA or retry time), n = attempts already made. Names sort as
# the dequeue order within one queue directory.
#
# Enqueue writes tmp/, fsyncs, renames into ready/ and fsyncs the directory, so
# an enqueue that returned survives a crash and a killed producer leaves only a
# temp file. ids/<sid>, made with O_EXCL first, makes enqueue idempotent by id.
# A claim renames ready/ -> leased/ with a fresh receipt token, the lease length
# (ms) and a beat counter in the name; extend renames it with the beat raised.
#
# Lease expiry compares no clocks across processes (a clock step on one host must
# neither hand a live lease to another worker nor keep a dead one): every process
# that claims also reaps, remembering each leased name with its own monotonic time
# when it first saw it, and renames back to ready/ (attempt + 1) a name unchanged
# for its lease length. A reaper that starts late, or sees a name change, waits a
# full lease. Claims, extends and plain acks skip the directory fsync: after a power
# loss they can only undo themselves, which redelivers the task (at-least-once).
# ack, retry and release of a lost lease change nothing: the task's new holder,
# or its next delivery, settles it. Unique keys are lock files made with link(),
# which creates them atomically with their content (O_EXCL without a window in
# which the file is empty); a finished task keeps its key in held/ for unique_ttl.

_PRIO_LIMIT = 10**9 - 1
_STALE_LOCK = 30.0  # seconds before a unique lock without a task counts as abandoned
_REAP_EVERY = 0.25  # seconds between scans of leased/ for expired leases
_SWEEP_EVERY = 60.0  # seconds between sweeps of held/ for unique keys past their time
_LISTING_TTL = 0.05  # seconds a ready-dir listing is trusted (more if listing is slow)
_IN_FLIGHT = 0.05  # seconds to look again for a task whose id is taken but not yet queued
_LEGACY_LEASE_MS = 30_000  # a lease named by an older OmniQ (with a deadline): the default

_clock_lock = threading.Lock()
_clock_last = 0


def _ready_time() -> int:
    """Microseconds, strictly increasing in this process: FIFO within one producer."""
    global _clock_last
    with _clock_lock:
        _clock_last = max(_now_us(), _clock_last + 1)
        return _clock_last


def _ready_name(priority: int, ready_us: int, sid: str, attempts: int) -> str:
    prio = 10**9 - max(-_PRIO_LIMIT, min(_PRIO_LIMIT, priority))
    return f"{prio:010d}~{ready_us:017d}~{sid}~{attempts}"


@dataclass(frozen=True)
class _Ready:
    """A parsed ready name."""

    name: str
    prio: str
    ready_us: int
    sid: str
    attempts: int

    @classmethod
    def parse(cls, name: str) -> _Ready | None:
        parts = name.split("~")
        if len(parts) != 4 or not parts[1].isdigit() or not parts[3].isdigit():
            return None  # not ours (an editor's swap file, a stray copy)
        return cls(name, parts[0], int(parts[1]), parts[2], int(parts[3]))

    def again(self, attempts: int, ready_us: int | None = None) -> str:
        ready = self.ready_us if ready_us is None else ready_us
        return f"{self.prio}~{ready:017d}~{self.sid}~{attempts}"


def _lease_ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


@dataclass(frozen=True)
class _Lease:
    """A parsed leased name: <lease ms>~<beat>~<token>~<queue>~<ready name>."""

    name: str
    lease_ms: int
    beat: int
    token: str
    queue: str
    ready: _Ready

    @classmethod
    def parse(cls, name: str) -> _Lease | None:
        parts = name.split("~")  # queue names and sids hold no "~"
        head, ready = parts[:-4], _Ready.parse("~".join(parts[-4:]))
        if len(head) == 3:  # <deadline>~<token>~<queue>, named by an older OmniQ
            head = [str(_LEGACY_LEASE_MS), head[0], head[1], head[2]]
        if ready is None or len(head) != 4 or not (head[0].isdigit() and head[1].isdigit()):
            return None
        return cls(name, int(head[0]), int(head[1]), head[2], head[3], ready)

    def renamed(self, lease_ms: int, beat: int) -> str:
        return f"{lease_ms}~{beat}~{self.token}~{self.queue}~{self.ready.name}"


@dataclass(frozen=True)
class _Spot:
    """Where a task's file is: its area (ready, leased, failed), queue and path."""

    area: str
    queue: str
    path: str


@dataclass(frozen=True)
class _Known:
    """What enqueue found of an id: new, still unfinished, or a dead letter (its spot)."""

    new: bool
    dead: _Spot | None = None


@dataclass
class _Listing:
    names: list[str]
    at: float
    cost: float
    generation: int

    def fresh(self, generation: int) -> bool:
        age = time.monotonic() - self.at
        return bool(self.names) and generation == self.generation and age < max(
            _LISTING_TTL, 10 * self.cost
        )


# Bumped when this process changes a ready directory, so listings cached by other
# handles here are redone at once; other processes are seen within _LISTING_TTL.
_generations: dict[str, int] = {}


def _bump(root: str) -> None:
    with _signals_lock:
        _generations[root] = _generations.get(root, 0) + 1


def _listdir(path: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(path) if not n.startswith("."))
    except FileNotFoundError:
        return []


def _key_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return None


class _Maildir:
    """The queue's blocking half: every method runs on the store's own thread."""

    AREAS = ("tmp", "ready", "leased", "failed", "ids", "unique", "held", "workers")

    def __init__(self, root: str, durable: bool) -> None:
        self.root = root
        self.durable = durable
        self.dirs = {area: os.path.join(root, area) for area in self.AREAS}
        for path in self.dirs.values():
            os.makedirs(path, exist_ok=True)
        _sweep_tmp(self.dirs["tmp"])
        self._made: set[str] = set()
        self._listings: dict[str, _Listing] = {}
        self._held: dict[str, str] = {}  # receipt token -> current leased name
        self._seen: dict[str, float] = {}  # leased name -> monotonic time first seen
        self._reaped_at = 0.0
        self._swept_at = time.monotonic()
        self._restore_set_aside()

    # -- small helpers --

    def _dir(self, area: str, queue: str) -> str:
        path = os.path.join(self.dirs[area], queue)
        if path not in self._made:
            os.makedirs(path, exist_ok=True)
            self._made.add(path)
        return path

    def _sync(self, path: str) -> None:
        if self.durable:
            _fsync_dir(path)

    def _leased(self, name: str) -> str:
        return os.path.join(self.dirs["leased"], name)

    def _id_path(self, sid: str) -> str:
        return os.path.join(self.dirs["ids"], sid)

    def _find(self, sid: str) -> Iterator[_Spot]:
        """The task's file wherever it is: ready, failed or leased."""
        for area in ("ready", "failed"):
            for queue in _listdir(self.dirs[area]):
                folder = os.path.join(self.dirs[area], queue)
                for name in _listdir(folder):
                    ready = _Ready.parse(name)
                    if ready is not None and ready.sid == sid:
                        yield _Spot(area, queue, os.path.join(folder, name))
        for name in _listdir(self.dirs["leased"]):
            lease = _Lease.parse(name)
            if lease is not None and lease.ready.sid == sid:
                yield _Spot("leased", lease.queue, self._leased(name))

    def _remove_if(self, path: str, doomed: Callable[[str], bool]) -> bool:
        """Remove `path` if `doomed(its moved-aside copy)`, else put it back. Of processes
        racing to remove it, only one can move it aside."""
        grave = os.path.join(self.dirs["tmp"], secrets.token_hex(8))
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return False
        try:
            if doomed(grave):
                return True
            with contextlib.suppress(FileExistsError):  # a newer one is there: it stands
                os.link(grave, path)
            return False
        finally:
            os.unlink(grave)

    def _restore_set_aside(self) -> None:
        """Put back the files an older OmniQ moved to queue/corrupt when they did not
        decode (their tasks then stayed pending forever): now they are delivered with
        their problem and end as failed outcomes."""
        corrupt = os.path.join(self.root, "corrupt")
        for name in _listdir(corrupt):
            lease = _Lease.parse(name)
            if lease is not None:
                dest = os.path.join(self._dir("ready", lease.queue), lease.ready.name)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(os.path.join(corrupt, name), dest)

    # -- enqueue --

    def enqueue(self, task: Task) -> str:
        check_queue_name(task.queue)
        if task.unique_key is not None:
            owner = self._lock(task.unique_key, task.id)
            if owner != task.id:
                return owner
        tmp = _write_tmp(self.dirs["tmp"], encode_task(task), self.durable)
        queued = False
        try:
            queued = self._enter(task, tmp)
        except BaseException:
            self._unlock(task)
            raise
        finally:
            if not queued:
                _unlink_quiet(tmp)
        return task.id

    def _enter(self, task: Task, tmp: str) -> bool:
        """Queue the written task `tmp` (True), unless a task of its id is unfinished."""
        sid = _sid(task.id)
        known = self._register_id(sid, task.id)
        if not known.new and known.dead is None:
            return False  # queued, scheduled or running: left as it is
        if known.dead is not None and not self._remove_if(known.dead.path, lambda _: True):
            return False  # a concurrent enqueue of this id queued it again first
        ready_us = _ready_time()
        if task.eta is not None:
            ready_us = max(ready_us, _us(task.eta))
        folder = self._dir("ready", task.queue)
        try:
            os.rename(tmp, os.path.join(folder, _ready_name(task.priority, ready_us, sid, 0)))
        except BaseException:
            _unlink_quiet(self._id_path(sid))
            raise
        self._sync(folder)
        _bump(self.root)
        return True

    def _register_id(self, sid: str, task_id: str) -> _Known:
        """Take the id's marker; if it was taken, say where the task of that id is."""
        path = self._id_path(sid)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            for pause in (0.0, _IN_FLIGHT):
                # An enqueue of this id may be between its marker and its rename: look twice.
                time.sleep(pause)
                spot = next(self._find(sid), None)
                if spot is not None:
                    return _Known(new=False, dead=spot if spot.area == "failed" else None)
            return _Known(new=True)  # a marker its task outlived (or a crash left): reuse it
        try:
            os.write(fd, task_id.encode())  # the real id, for a task whose sid is a hash
        finally:
            os.close(fd)
        return _Known(new=True)

    def _task_id(self, sid: str) -> str:
        """The task id a file name's sid stands for (a hash for ids that are no file name)."""
        if not sid.startswith("="):
            return sid
        data = _read_quiet(self._id_path(sid))
        return data.decode(errors="replace") if data else sid

    # -- unique keys --

    def _lock_path(self, key: str) -> str:
        return os.path.join(self.dirs["unique"], _key_name(key))

    def _hold_path(self, key: str) -> str:
        return os.path.join(self.dirs["held"], _key_name(key))

    def _lock(self, key: str, task_id: str) -> str:
        """Take the key for `task_id`, or return the id of the task holding it."""
        path = self._lock_path(key)
        for _ in range(5):
            # link() creates the lock with its content in one step: nobody reads it empty.
            tmp = _write_tmp(self.dirs["tmp"], task_id.encode(), self.durable)
            try:
                os.link(tmp, path)
                return self._check_hold(key, task_id)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            owner = self._lock_owner(path)
            if owner is not None:
                return owner
        raise BackendError(f"file queue: could not take the lock of unique key {key!r}")

    def _check_hold(self, key: str, task_id: str) -> str:
        """We took the lock; a finished task may still hold the key for its unique_ttl.
        (A finisher writes its hold before it drops its lock, so none is missed.)"""
        holder = self._hold_owner(key)
        if holder is not None and holder != task_id:
            _unlink_quiet(self._lock_path(key))  # young and ours: nobody else removes it
            return holder
        if holder == task_id:  # its dead letter is queued again: the key is its own again
            self._remove_if(self._hold_path(key), lambda g: _read_quiet(g) == task_id.encode())
        self._sync(self.dirs["unique"])
        return task_id

    def _hold_owner(self, key: str) -> str | None:
        path = self._hold_path(key)
        until = _mtime(path)
        if until is None:
            return None
        if until > time.time():
            data = _read_quiet(path)
            return data.decode() if data else None
        self._drop_expired_hold(path)
        return None

    def _drop_expired_hold(self, path: str) -> None:
        self._remove_if(path, lambda grave: (_mtime(grave) or 0.0) <= time.time())

    def _lock_owner(self, path: str) -> str | None:
        """The lock's task id; None when it is gone or was abandoned (then it is removed)."""
        try:
            age = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return None
        data = _read_quiet(path)
        if data is None:
            return None
        owner = data.decode()
        if age < _STALE_LOCK or next(self._find(_sid(owner)), None) is not None:
            return owner
        # Its producer died between locking and publishing: only one stealer wins the rename.
        self._remove_if(path, lambda grave: _read_quiet(grave) == data)
        return None

    def _settle_key(self, task: Task) -> None:
        """The task finished (either way): hold its key for unique_ttl more, or free it."""
        key = task.unique_key
        if key is None:
            return
        mine = task.id.encode()
        if task.unique_ttl and _read_quiet(self._lock_path(key)) == mine:
            tmp = _write_tmp(self.dirs["tmp"], mine, self.durable)
            until = time.time() + task.unique_ttl
            os.utime(tmp, (until, until))  # the mtime is the end of the hold; rename keeps it
            os.replace(tmp, self._hold_path(key))
        self._remove_if(self._lock_path(key), lambda grave: _read_quiet(grave) == mine)

    def _unlock(self, task: Task) -> None:
        """Cancel and purge free the key at once, held or not."""
        if task.unique_key is None:
            return
        mine = task.id.encode()
        for path in (self._lock_path(task.unique_key), self._hold_path(task.unique_key)):
            if _read_quiet(path) == mine:
                self._remove_if(path, lambda grave: _read_quiet(grave) == mine)

    # -- claiming --

    def claim(self, queues: Sequence[str], lease: float) -> Delivery | None:
        for queue in queues:
            check_queue_name(queue)
        self._reap()
        now = _now_us()
        for queue in queues:
            delivery = self._claim_queue(queue, lease, now)
            if delivery is not None:
                return delivery
        return None

    def _claim_queue(self, queue: str, lease: float, now: int) -> Delivery | None:
        listing, cached = self._listing(queue)
        delivery = self._claim_from(queue, listing, lease, now)
        if delivery is None and cached:
            listing, _ = self._listing(queue, force=True)
            delivery = self._claim_from(queue, listing, lease, now)
        return delivery

    def _listing(self, queue: str, force: bool = False) -> tuple[_Listing, bool]:
        generation = _generations.get(self.root, 0)
        listing = self._listings.get(queue)
        if not force and listing is not None and listing.fresh(generation):
            return listing, True
        start = time.monotonic()
        names = _listdir(os.path.join(self.dirs["ready"], queue))
        done = time.monotonic()
        listing = _Listing(names, done, done - start, generation)
        self._listings[queue] = listing
        return listing, False

    def _claim_from(
        self, queue: str, listing: _Listing, lease: float, now: int
    ) -> Delivery | None:
        keep: list[str] = []
        found: Delivery | None = None
        for i, name in enumerate(listing.names):
            ready = _Ready.parse(name)
            if ready is None or ready.ready_us > now:
                keep.append(name)
                continue
            found = self._take(queue, ready, lease)
            if found is not None:
                keep.extend(listing.names[i + 1 :])
                break
        listing.names = keep
        return found

    def _take(self, queue: str, ready: _Ready, lease: float) -> Delivery | None:
        token = secrets.token_hex(6)
        name = f"{_lease_ms(lease)}~0~{token}~{queue}~{ready.name}"
        try:
            # The claim: of all processes renaming this file, exactly one succeeds.
            os.rename(os.path.join(self.dirs["ready"], queue, ready.name), self._leased(name))
        except FileNotFoundError:
            return None
        data = _read_quiet(self._leased(name))
        if data is None:
            return None
        # A payload that does not decode is still delivered, so the worker fails it.
        task, problem = decode_task_or_placeholder(data, self._task_id(ready.sid), queue)
        self._held[token] = name
        return Delivery(task=task, attempt=ready.attempts + 1, receipt=token, problem=problem)

    def _reap(self) -> None:
        """Move leases unchanged for their length back to ready, attempt counted (any
        process may). Judged by this process's monotonic clock alone: see above."""
        now = time.monotonic()
        if now - self._reaped_at < _REAP_EVERY:
            return
        self._reaped_at = now
        seen: dict[str, float] = {}
        moved = False
        for name in _listdir(self.dirs["leased"]):
            lease = _Lease.parse(name)
            if lease is None:
                continue
            first = seen[name] = self._seen.get(name, now)
            if now - first >= lease.lease_ms / 1000:
                moved = self._reclaim(lease) or moved
        self._seen = seen
        if moved:
            _bump(self.root)
        if now - self._swept_at >= _SWEEP_EVERY:
            self._swept_at = now
            self._sweep_holds()

    def _reclaim(self, lease: _Lease) -> bool:
        ready = lease.ready
        # Due at once, even for a reaper whose clock is behind the claimer's.
        name = ready.again(ready.attempts + 1, min(ready.ready_us, _now_us()))
        dest = os.path.join(self._dir("ready", lease.queue), name)
        try:
            os.rename(self._leased(lease.name), dest)
        except FileNotFoundError:  # extended, finished or reaped already
            return False
        return True

    def _sweep_holds(self) -> None:
        """Remove unique-key holds past their time (else only a later enqueue of the same
        key would notice them)."""
        now = time.time()
        for name in _listdir(self.dirs["held"]):
            path = os.path.join(self.dirs["held"], name)
            if (_mtime(path) or now + 1) <= now:
                self._drop_expired_hold(path)

    # -- settling a delivery --

    def _on_lease(self, token: str, act: Callable[[_Lease], str | None]) -> bool:
        """Run `act` on the delivery's leased file; False when the lease was lost.

        `act` returns the new leased name when the task stays leased, else None.
        """
        name = self._held.pop(token, None)
        for _ in range(2):
            name = name or self._scan_token(token)
            lease = _Lease.parse(name) if name else None
            if lease is None:
                return False
            try:
                kept = act(lease)
            except FileNotFoundError:  # renamed by another handle (extend) or reaped
                name = None
                continue
            if kept is not None:
                self._held[token] = kept
            return True
        return False

    def _scan_token(self, token: str) -> str | None:
        for name in _listdir(self.dirs["leased"]):
            lease = _Lease.parse(name)
            if lease is not None and lease.token == token:
                return name
        return None

    def ack(self, token: str, task: Task, failed: bool) -> bool:
        def finish(lease: _Lease) -> None:
            if failed:  # a dead letter keeps its id marker: enqueue of its id revives it
                folder = self._dir("failed", lease.queue)
                dead = lease.ready.again(lease.ready.attempts + 1)
                os.rename(self._leased(lease.name), os.path.join(folder, dead))
                self._sync(folder)
            else:
                os.unlink(self._leased(lease.name))
                _unlink_quiet(self._id_path(lease.ready.sid))

        # A lost lease is left alone: its new holder, or the next delivery, settles it.
        if not self._on_lease(token, finish):
            return False
        self._settle_key(task)
        return True

    def retry(self, token: str, delay: float) -> bool:
        def requeue(lease: _Lease) -> None:
            ready_us = _now_us() + int(delay * 1e6)
            folder = self._dir("ready", lease.queue)
            name = lease.ready.again(lease.ready.attempts + 1, ready_us)
            os.rename(self._leased(lease.name), os.path.join(folder, name))
            self._sync(folder)

        if not self._on_lease(token, requeue):
            return False
        _bump(self.root)
        return True

    def release(self, token: str) -> None:
        def hand_back(lease: _Lease) -> None:
            folder = self._dir("ready", lease.queue)
            os.rename(self._leased(lease.name), os.path.join(folder, lease.ready.name))
            self._sync(folder)

        if self._on_lease(token, hand_back):
            _bump(self.root)

    def extend(self, token: str, lease_seconds: float) -> bool:
        def renew(lease: _Lease) -> str:
            # A new name is the heartbeat every reaper watches for.
            name = lease.renamed(_lease_ms(lease_seconds), lease.beat + 1)
            os.rename(self._leased(lease.name), self._leased(name))
            return name

        return self._on_lease(token, renew)

    # -- inspection and removal --

    def _discard(self, folder: str, name: str) -> bool:
        """Remove a waiting or dead task (its id and unique key go too); False if it moved."""
        grave = os.path.join(self.dirs["tmp"], secrets.token_hex(8))
        try:
            os.rename(os.path.join(folder, name), grave)
        except FileNotFoundError:
            return False
        data = _read_quiet(grave)
        os.unlink(grave)
        self._sync(folder)
        ready = _Ready.parse(name)
        if ready is not None:
            _unlink_quiet(self._id_path(ready.sid))
            if data is not None:
                task, _ = decode_task_or_placeholder(data, self._task_id(ready.sid))
                self._unlock(task)
        return True

    def cancel(self, task_id: str) -> bool:
        sid = _sid(task_id)
        for queue in _listdir(self.dirs["ready"]):
            folder = os.path.join(self.dirs["ready"], queue)
            for name in _listdir(folder):
                ready = _Ready.parse(name)
                if ready is not None and ready.sid == sid and self._discard(folder, name):
                    _bump(self.root)
                    return True
        return False

    def get_task(self, task_id: str) -> Task | None:
        for _ in range(3):
            spots = list(self._find(_sid(task_id)))
            if not spots:
                return None
            for spot in spots:
                data = _read_quiet(spot.path)
                if data is not None:
                    return decode_task_or_placeholder(data, task_id, spot.queue)[0]
            # Every copy moved while we looked (claimed, reaped): look again.
        return None

    def stats(self) -> list[QueueStats]:
        now = _now_us()
        counts: dict[str, dict[str, int]] = {}

        def add(queue: str, state: str, n: int = 1) -> None:
            per = counts.setdefault(queue, {})
            per[state] = per.get(state, 0) + n

        for queue in _listdir(self.dirs["ready"]):
            for name in _listdir(os.path.join(self.dirs["ready"], queue)):
                ready = _Ready.parse(name)
                if ready is not None:
                    add(queue, "scheduled" if ready.ready_us > now else "queued")
        for name in _listdir(self.dirs["leased"]):
            lease = _Lease.parse(name)
            if lease is not None:
                add(lease.queue, "running")
        for queue in _listdir(self.dirs["failed"]):
            add(queue, "failed", len(_listdir(os.path.join(self.dirs["failed"], queue))))
        return [
            QueueStats(queue=queue, queued=per.get("queued", 0),
                       scheduled=per.get("scheduled", 0), running=per.get("running", 0),
                       failed=per.get("failed", 0))
            for queue, per in sorted(counts.items())
            if any(per.values())
        ]

    def purge(self, queue: str | None) -> int:
        count = 0
        for area in ("ready", "failed"):
            queues = [queue] if queue is not None else _listdir(self.dirs[area])
            for name in queues:
                folder = os.path.join(self.dirs[area], name)
                count += sum(self._discard(folder, n) for n in _listdir(folder))
        self._listings.clear()
        _bump(self.root)
        return count

    # -- worker registry --

    def _worker_path(self, worker_id: str) -> str:
        return os.path.join(self.dirs["workers"], _sid(worker_id) + ".json")

    def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        tmp = _write_tmp(self.dirs["tmp"], encode_worker(info), durable=False)
        until = time.time() + ttl
        os.utime(tmp, (until, until))  # the mtime is the expiry; rename keeps it
        os.replace(tmp, self._worker_path(info.worker_id))

    def unregister_worker(self, worker_id: str) -> None:
        _unlink_quiet(self._worker_path(worker_id))

    def workers(self) -> list[WorkerInfo]:
        now = time.time()
        found = []
        for name in _listdir(self.dirs["workers"]):
            path = os.path.join(self.dirs["workers"], name)
            until = _mtime(path)
            if until is None:
                continue
            if until <= now - _TMP_MAX_AGE:
                _unlink_quiet(path)  # long dead; a live worker would have refreshed it
            data = _read_quiet(path) if until > now else None
            if data is not None:
                with contextlib.suppress(CorruptRecord):  # a bad file hides one worker only
                    found.append(decode_worker(data))
        return sorted(found, key=lambda w: w.worker_id)


class FileQueue:
    """A queue of files on a local or NFS-mounted POSIX filesystem (needs atomic rename)."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        durable: bool = True,
        poll_interval: float = 0.25,
    ) -> None:
        local = _local_path(base_dir)
        if local is None:
            raise ConfigError(
                f"the file queue cannot use {redact(os.fspath(base_dir))!r}: a queue needs "
                "atomic rename, which object stores lack; use the sqlite, redis, postgres or "
                "nats queue, or a local/NFS path"
            )
        self._root = os.path.join(local, "queue")
        self._durable = durable
        self._poll_interval = poll_interval
        self._runner = BlockingRunner("omniq-file-queue")
        self._box: _Maildir | None = None
        self._signal = _signal_for(self._root)

    def _in_thread(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._box is None:
            self._box = _Maildir(self._root, self._durable)
        return fn(self._box, *args)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await _run_translated(self._runner, self._root, self._in_thread, fn, args)

    async def open(self) -> None:
        await self._call(lambda box: None)

    async def close(self) -> None:
        runner = self._runner
        await asyncio.get_running_loop().run_in_executor(None, runner.shutdown)

    async def enqueue(self, task: Task) -> str:
        task_id = await self._call(_Maildir.enqueue, task)
        self._signal.notify("ready")
        return task_id

    async def dequeue(
        self, queues: Sequence[str], lease: float, timeout: float
    ) -> Delivery | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        backoff = PollingBackoff(first=0.005, most=self._poll_interval)
        names = list(queues)
        while True:
            generation = _generations.get(self._root, 0)
            delivery = await self._call(_Maildir.claim, names, lease)
            if delivery is not None:
                return delivery
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            if _generations.get(self._root, 0) != generation:
                continue  # this process changed the queue while we looked: look again
            if await self._signal.wait("ready", min(backoff.next(), remaining)):
                backoff.reset()

    async def ack(self, delivery: Delivery, *, failed: bool = False) -> bool:
        return await self._call(_Maildir.ack, delivery.receipt, delivery.task, failed)

    async def retry(self, delivery: Delivery, delay: float) -> bool:
        retried = await self._call(_Maildir.retry, delivery.receipt, delay)
        if retried:
            self._signal.notify("ready")
        return retried

    async def release(self, delivery: Delivery) -> None:
        await self._call(_Maildir.release, delivery.receipt)
        self._signal.notify("ready")

    async def extend(self, delivery: Delivery, lease: float) -> bool:
        return await self._call(_Maildir.extend, delivery.receipt, lease)

    async def cancel(self, task_id: str) -> bool:
        return await self._call(_Maildir.cancel, task_id)

    async def get_task(self, task_id: str) -> Task | None:
        return await self._call(_Maildir.get_task, task_id)

    async def stats(self) -> list[QueueStats]:
        return await self._call(_Maildir.stats)

    async def purge(self, queue: str | None = None) -> int:
        return await self._call(_Maildir.purge, queue)

    async def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        await self._call(_Maildir.register_worker, info, ttl)

    async def unregister_worker(self, worker_id: str) -> None:
        await self._call(_Maildir.unregister_worker, worker_id)

    async def workers(self) -> list[WorkerInfo]:
        return await self._call(_Maildir.workers)


# --- registry ------------------------------------------------------------------


def create(role: Role, settings: Mapping[str, Any]) -> Any:
    """Build an unopened store: `base_dir` is a local path or an fsspec URL."""
    base_dir = settings.get("base_dir") or settings.get("path")
    if base_dir is None:
        raise ConfigError(f"the file {role} store needs a directory (setting 'base_dir')")
    options = _options(role, settings.get("options") or {})
    storage_options = settings.get("storage_options")
    if role == "queue":
        if storage_options:
            raise ConfigError(
                "the file queue takes no storage_options: it runs on a local/NFS path only"
            )
        return FileQueue(base_dir, **options)
    if role == "results":
        return FileResultStorage(base_dir, storage_options, **options)
    return FileEventStorage(base_dir, storage_options, **options)
