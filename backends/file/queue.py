"""The file queue: a maildir on one POSIX filesystem (local or NFS). Every state change is
one atomic rename, so whoever wins a rename owns the task and losers see ENOENT::

    queue/tmp/<random>                          being written; never visible
    queue/ready/<queue>/<P>~<T>~<sid>~<n>       waiting; T in the future = scheduled
    queue/leased/<ms>~<beat>~<token>~<queue>~<ready name>   held by one worker
    queue/failed/<queue>/<YYYYMMDD>/<HHMM>/<F>~<sid>   dead letters, by failure time
    queue/dead/<sid>                            symlink naming its dead letter (failed.py)
    queue/ids/<sid>                             the task id, while it is unfinished or dead
    queue/unique/<sha256(key)>                  the id of the unfinished task holding the key
    queue/held/<sha256(key)>                    a finished task's id; mtime = held until
    queue/workers/<sid>.json                    mtime = the worker's expiry
    queue/records/<kind>/<name>                 named records (schedules, cancel requests)

P = 10**9 - priority (so higher runs first), T = ready time in microseconds
(enqueue time, ETA or retry time), n = attempts already made, F = failure time in
microseconds. Names sort as the dequeue order within one queue directory; dead letters
sort by failure time (see failed.py for that index and its cost).

Enqueue writes tmp/, fsyncs, renames into ready/ and fsyncs the directory, so
an enqueue that returned survives a crash and a killed producer leaves only a
temp file. ids/<sid>, made with O_EXCL first, makes enqueue idempotent by id.
A claim renames ready/ -> leased/ with a fresh receipt token, the lease length
(ms) and a beat counter in the name; extend renames it with the beat raised.

Lease expiry compares no clocks across processes (a clock step on one host must
neither hand a live lease to another worker nor keep a dead one): every process
that claims also reaps, remembering each leased name with its own monotonic time
when it first saw it (or made it: its own claims and extends), and renames back to
ready/ (attempt + 1) a name unchanged for its lease length. A reaper that starts
late, or sees another process's name change, waits a full lease. Claims, extends
and plain acks skip the directory fsync: after a power loss they can only undo
themselves, which redelivers the task (at-least-once).
ack, retry and release of a lost lease change nothing: the task's new holder,
or its next delivery, settles it. Unique keys are lock files made with link(),
which creates them atomically with their content (O_EXCL without a window in
which the file is empty); a finished task keeps its key in held/ for unique_ttl.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from omniq.errors import BackendError, ConfigError, CorruptRecord, OmniQError, redact
from omniq.models import (
    Delivery,
    FailedTask,
    QueueStats,
    Task,
    WorkerInfo,
    check_queue_name,
    check_record_name,
)
from omniq.serialization import (
    decode_task_or_placeholder,
    decode_worker,
    encode_task,
    encode_worker,
)
from omniq.storage import LocalSignal, PollingBackoff

from . import failed as dead_letters
from .common import (
    TMP_MAX_AGE,
    fsync_dir,
    local_path,
    now_us,
    read_quiet,
    rename_into,
    sid_of,
    sweep_tmp,
    unlink_quiet,
    us,
    utc,
    write_tmp,
)

if TYPE_CHECKING:
    from .backend import LocalFileBackend

T = TypeVar("T")

_PRIO_LIMIT = 10**9 - 1
# Seconds before a unique lock without a task counts as abandoned (its producer died
# between locking and publishing, a few ms apart): longer than any publish takes, short
# enough that a schedule slot whose firing worker was killed there is not skipped.
_STALE_LOCK = 5.0
_REAP_EVERY = 0.25  # seconds between scans of leased/ for expired leases
_SWEEP_EVERY = 60.0  # seconds between sweeps of held/ for unique keys past their time
_LISTING_TTL = 0.05  # seconds a ready-dir listing is trusted (more if listing is slow)
_IN_FLIGHT = 0.05  # seconds to look again for a task whose id is taken but not yet queued
_LEGACY_LEASE_MS = 30_000  # a lease named by an older OmniQ (with a deadline): the default

_clock_lock = threading.Lock()
_clock_last = 0


def _ready_time() -> int:
    """Microseconds, strictly increasing in this process: FIFO within one producer, and
    no two dead letters it files share a failure time (paging by time skips none)."""
    global _clock_last
    with _clock_lock:
        _clock_last = max(now_us(), _clock_last + 1)
        return _clock_last


def _ready_name(priority: int, ready_us: int, name: str, attempts: int) -> str:
    prio = 10**9 - max(-_PRIO_LIMIT, min(_PRIO_LIMIT, priority))
    return f"{prio:010d}~{ready_us:017d}~{name}~{attempts}"


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
_generations_lock = threading.Lock()


def generation(root: str) -> int:
    return _generations.get(root, 0)


def _bump(root: str) -> None:
    with _generations_lock:
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


class Maildir:
    """The queue's blocking half: every method runs on the Backend's queue thread."""

    AREAS = ("tmp", "ready", "leased", "failed", "dead", "ids", "unique", "held", "workers",
             "records")

    def __init__(self, root: str, durable: bool) -> None:
        self.root = root
        self.durable = durable
        self.dirs = {area: os.path.join(root, area) for area in self.AREAS}
        for path in self.dirs.values():
            os.makedirs(path, exist_ok=True)
        sweep_tmp(self.dirs["tmp"])
        self._made: set[str] = set()
        self._listings: dict[str, _Listing] = {}
        self._held: dict[str, str] = {}  # receipt token -> current leased name
        self._seen: dict[str, float] = {}  # leased name -> monotonic time first seen
        self._reaped_at = 0.0
        self._swept_at = time.monotonic()
        self.hints = dead_letters.Hints(root, self._sync)
        self._restore_set_aside()
        for queue in _listdir(self.dirs["failed"]):
            self._file_legacy(queue)

    # -- small helpers --

    def _dir(self, area: str, queue: str) -> str:
        path = os.path.join(self.dirs[area], queue)
        if path not in self._made:
            os.makedirs(path, exist_ok=True)
            self._made.add(path)
        return path

    def _sync(self, path: str) -> None:
        if self.durable:
            fsync_dir(path)

    def _leased(self, name: str) -> str:
        return os.path.join(self.dirs["leased"], name)

    def _id_path(self, sid: str) -> str:
        return os.path.join(self.dirs["ids"], sid)

    def _find(self, sid: str) -> Iterator[_Spot]:
        """The task's file wherever it is: failed (by its hint, at once), ready or leased."""
        dead = self._dead_spot(sid, legacy=False)
        if dead is not None:
            yield dead
        for queue in _listdir(self.dirs["ready"]):
            folder = os.path.join(self.dirs["ready"], queue)
            for name in _listdir(folder):
                ready = _Ready.parse(name)
                if ready is not None and ready.sid == sid:
                    yield _Spot("ready", queue, os.path.join(folder, name))
        for name in _listdir(self.dirs["leased"]):
            lease = _Lease.parse(name)
            if lease is not None and lease.ready.sid == sid:
                yield _Spot("leased", lease.queue, self._leased(name))
        legacy = self._legacy_spot(sid)  # filed by an older OmniQ running beside us
        if legacy is not None:
            yield legacy

    def _dead_spot(self, sid: str, legacy: bool = True) -> _Spot | None:
        """The task's dead letter: by its hint, else (if `legacy`) one an older OmniQ filed."""
        dead = self.hints.find(sid)
        if dead is not None:
            return _Spot("failed", dead.queue, dead.path)
        return self._legacy_spot(sid) if legacy else None

    def _legacy_spot(self, sid: str) -> _Spot | None:
        for queue in _listdir(self.dirs["failed"]):
            path = dead_letters.legacy_of(os.path.join(self.dirs["failed"], queue), sid)
            if path is not None:
                return _Spot("failed", queue, path)
        return None

    def _file_legacy(self, queue: str) -> None:
        top = os.path.join(self.dirs["failed"], queue)
        dead_letters.file_legacy(top, queue, self.hints, self._sync)

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

    def enqueue(self, task: Task, announce: Callable[[], None] | None = None) -> str:
        """Queue `task`; a held unique key queues nothing and returns its holder's id.
        `announce` runs once the key is ours, before the task can be seen (the fused
        submit writes its ENQUEUED event there)."""
        check_queue_name(task.queue)
        if task.unique_key is not None:
            owner = self._lock(task.unique_key, task.id)
            if owner != task.id:
                return owner
        tmp: str | None = None
        queued = False
        try:
            if announce is not None:
                announce()
            tmp = write_tmp(self.dirs["tmp"], encode_task(task), self.durable)
            queued = self._enter(task, tmp)
        except BaseException:
            self._unlock(task)
            raise
        finally:
            if tmp is not None and not queued:
                unlink_quiet(tmp)
        return task.id

    def _enter(self, task: Task, tmp: str) -> bool:
        """Queue the written task `tmp` (True), unless a task of its id is unfinished."""
        sid = sid_of(task.id)
        known = self._register_id(sid, task.id)
        if not known.new and known.dead is None:
            return False  # queued, scheduled or running: left as it is
        if known.dead is not None:
            if not self._remove_if(known.dead.path, lambda _: True):
                return False  # a concurrent enqueue of this id queued it again first
            self._buried(known.dead.path)
        ready_us = _ready_time()
        if task.eta is not None:
            ready_us = max(ready_us, us(task.eta))
        folder = self._dir("ready", task.queue)
        try:
            os.rename(tmp, os.path.join(folder, _ready_name(task.priority, ready_us, sid, 0)))
        except BaseException:
            unlink_quiet(self._id_path(sid))
            raise
        self._sync(folder)
        _bump(self.root)
        return True

    def _register_id(self, sid: str, task_id: str) -> _Known:
        """Take the id's marker; if it was taken, say where the task of that id is."""
        path = self._id_path(sid)
        for pause in (0.0, _IN_FLIGHT, None):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                if pause is None:  # a marker its task outlived (or a crash left): reuse it
                    return _Known(new=True)
            # An enqueue of this id may be between its marker and its rename, or a finish,
            # cancel or forget between its file's removal and its marker's: look twice,
            # taking the marker if it went meanwhile.
            time.sleep(pause)
            spot = next(self._find(sid), None)
            if spot is not None:
                return _Known(new=False, dead=spot if spot.area == "failed" else None)
        try:
            os.write(fd, task_id.encode())  # the real id, for a task whose sid is a hash
        finally:
            os.close(fd)
        return _Known(new=True)

    def _task_id(self, sid: str) -> str:
        """The task id a file name's sid stands for (a hash for ids that are no file name)."""
        if not sid.startswith("="):
            return sid
        data = read_quiet(self._id_path(sid))
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
            tmp = write_tmp(self.dirs["tmp"], task_id.encode(), self.durable)
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
            unlink_quiet(self._lock_path(key))  # young and ours: nobody else removes it
            return holder
        if holder == task_id:  # its dead letter is queued again: the key is its own again
            self._remove_if(self._hold_path(key), lambda g: read_quiet(g) == task_id.encode())
        self._sync(self.dirs["unique"])
        return task_id

    def _hold_owner(self, key: str) -> str | None:
        path = self._hold_path(key)
        until = _mtime(path)
        if until is None:
            return None
        if until > time.time():
            data = read_quiet(path)
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
        data = read_quiet(path)
        if data is None:
            return None
        owner = data.decode()
        if age < _STALE_LOCK or next(self._find(sid_of(owner)), None) is not None:
            return owner
        # Its producer died between locking and publishing: only one stealer wins the rename.
        self._remove_if(path, lambda grave: read_quiet(grave) == data)
        return None

    def _settle_key(self, task: Task) -> None:
        """The task finished (either way): hold its key for unique_ttl more, or free it."""
        key = task.unique_key
        if key is None:
            return
        mine = task.id.encode()
        if task.unique_ttl and read_quiet(self._lock_path(key)) == mine:
            tmp = write_tmp(self.dirs["tmp"], mine, self.durable)
            until = time.time() + task.unique_ttl
            os.utime(tmp, (until, until))  # the mtime is the end of the hold; rename keeps it
            os.replace(tmp, self._hold_path(key))
        self._remove_if(self._lock_path(key), lambda grave: read_quiet(grave) == mine)

    def _unlock(self, task: Task) -> None:
        """Cancel and purge free the key at once, held or not."""
        if task.unique_key is None:
            return
        mine = task.id.encode()
        for path in (self._lock_path(task.unique_key), self._hold_path(task.unique_key)):
            if read_quiet(path) == mine:
                self._remove_if(path, lambda grave: read_quiet(grave) == mine)

    # -- claiming --

    def claim(self, queues: Sequence[str], lease: float, limit: int) -> list[Delivery]:
        """Up to `limit` ready tasks, in dequeue order (queue order, then name order)."""
        for queue in queues:
            check_queue_name(queue)
        self._reap()
        now = now_us()
        got: list[Delivery] = []
        for queue in queues:
            if len(got) >= limit:
                break
            got += self._claim_queue(queue, lease, now, limit - len(got))
        return got

    def _claim_queue(self, queue: str, lease: float, now: int, limit: int) -> list[Delivery]:
        listing, cached = self._listing(queue)
        got = self._claim_from(queue, listing, lease, now, limit)
        if len(got) < limit and cached:  # others may have queued more since
            listing, _ = self._listing(queue, force=True)
            got += self._claim_from(queue, listing, lease, now, limit - len(got))
        return got

    def _listing(self, queue: str, force: bool = False) -> tuple[_Listing, bool]:
        current = generation(self.root)
        listing = self._listings.get(queue)
        if not force and listing is not None and listing.fresh(current):
            return listing, True
        start = time.monotonic()
        names = _listdir(os.path.join(self.dirs["ready"], queue))
        done = time.monotonic()
        listing = _Listing(names, done, done - start, current)
        self._listings[queue] = listing
        return listing, False

    def _claim_from(
        self, queue: str, listing: _Listing, lease: float, now: int, limit: int
    ) -> list[Delivery]:
        keep: list[str] = []
        found: list[Delivery] = []
        for i, name in enumerate(listing.names):
            if len(found) >= limit:
                keep.extend(listing.names[i:])
                break
            ready = _Ready.parse(name)
            if ready is None or ready.ready_us > now:
                keep.append(name)
                continue
            delivery = self._take(queue, ready, lease)
            if delivery is not None:  # else another claimer got it: gone from the listing
                found.append(delivery)
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
        self._seen[name] = time.monotonic()  # our own lease: its age is known from now
        data = read_quiet(self._leased(name))
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
        name = ready.again(ready.attempts + 1, min(ready.ready_us, now_us()))
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
                self._bury(lease)
            else:
                os.unlink(self._leased(lease.name))
                unlink_quiet(self._id_path(lease.ready.sid))

        # A lost lease is left alone: its new holder, or the next delivery, settles it.
        if not self._on_lease(token, finish):
            return False
        self._settle_key(task)
        return True

    def retry(self, token: str, delay: float) -> bool:
        def requeue(lease: _Lease) -> None:
            ready_us = now_us() + int(delay * 1e6)
            folder = self._dir("ready", lease.queue)
            name = lease.ready.again(lease.ready.attempts + 1, ready_us)
            os.rename(self._leased(lease.name), os.path.join(folder, name))
            self._sync(folder)

        if not self._on_lease(token, requeue):
            return False
        _bump(self.root)
        return True

    def release(self, token: str, delay: float = 0.0) -> None:
        def hand_back(lease: _Lease) -> None:
            folder = self._dir("ready", lease.queue)
            name = lease.ready.name  # at once: back in its place in the queue
            if delay > 0:  # scheduled: its attempt count unchanged
                name = lease.ready.again(lease.ready.attempts, now_us() + int(delay * 1e6))
            os.rename(self._leased(lease.name), os.path.join(folder, name))
            self._sync(folder)

        if self._on_lease(token, hand_back):
            _bump(self.root)

    def extend(self, token: str, lease_seconds: float) -> bool:
        def renew(lease: _Lease) -> str:
            # A new name is the heartbeat every reaper watches for.
            name = lease.renamed(_lease_ms(lease_seconds), lease.beat + 1)
            os.rename(self._leased(lease.name), self._leased(name))
            self._seen[name] = time.monotonic()
            return name

        return self._on_lease(token, renew)

    # -- inspection and removal --

    def _discard(self, folder: str, name: str) -> bool:
        """Remove a waiting or dead task (its id and unique key go too); False if it moved."""
        dead = dead_letters.parse_dead(name)
        ready = _Ready.parse(name)
        sid = dead[1] if dead is not None else ready.sid if ready is not None else None
        grave = os.path.join(self.dirs["tmp"], secrets.token_hex(8))
        try:
            os.rename(os.path.join(folder, name), grave)
        except FileNotFoundError:
            return False
        task_id = None if sid is None else self._task_id(sid)  # (read from its marker)
        if sid is not None:  # the marker at once: see _register_id
            unlink_quiet(self._id_path(sid))
        data = read_quiet(grave)
        os.unlink(grave)
        self._sync(folder)
        if dead is not None:
            self._buried(os.path.join(folder, name))
        if data is not None and task_id is not None:
            self._unlock(decode_task_or_placeholder(data, task_id)[0])
        return True

    def cancel(self, task_id: str) -> bool:
        sid = sid_of(task_id)
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
            seen = False
            for spot in self._find(sid_of(task_id)):  # a dead letter at once, by its hint
                seen = True
                data = read_quiet(spot.path)
                if data is not None:
                    return decode_task_or_placeholder(data, task_id, spot.queue)[0]
            if not seen:
                return None
            # Every copy moved while we looked (claimed, reaped): look again.
        return None

    def stats(self) -> list[QueueStats]:
        counts: dict[str, dict[str, int]] = {}

        def add(queue: str, state: str, n: int = 1) -> None:
            per = counts.setdefault(queue, {})
            per[state] = per.get(state, 0) + n

        oldest = self._count_ready(add)
        for name in _listdir(self.dirs["leased"]):
            lease = _Lease.parse(name)
            if lease is not None:
                add(lease.queue, "running")
        for queue in _listdir(self.dirs["failed"]):
            add(queue, "failed", dead_letters.count(os.path.join(self.dirs["failed"], queue)))
        return [
            QueueStats(queue=queue, queued=per.get("queued", 0),
                       scheduled=per.get("scheduled", 0), running=per.get("running", 0),
                       failed=per.get("failed", 0),
                       oldest_ready_at=utc(oldest[queue]) if queue in oldest else None)
            for queue, per in sorted(counts.items())
            if any(per.values())
        ]

    def _count_ready(self, add: Callable[[str, str], None]) -> dict[str, int]:
        """Count waiting tasks as queued or scheduled; since when (us) the longest-waiting
        ready task of each queue is ready (its enqueue, ETA or retry time)."""
        now = now_us()
        oldest: dict[str, int] = {}
        for queue in _listdir(self.dirs["ready"]):
            for name in _listdir(os.path.join(self.dirs["ready"], queue)):
                ready = _Ready.parse(name)
                if ready is None:
                    continue
                if ready.ready_us > now:
                    add(queue, "scheduled")
                    continue
                add(queue, "queued")
                oldest[queue] = min(oldest.get(queue, ready.ready_us), ready.ready_us)
        return oldest

    def purge(self, queue: str | None) -> int:
        count = 0
        for name in [queue] if queue is not None else _listdir(self.dirs["ready"]):
            folder = os.path.join(self.dirs["ready"], name)
            count += sum(self._discard(folder, n) for n in _listdir(folder))
        for name in [queue] if queue is not None else _listdir(self.dirs["failed"]):
            every = list(dead_letters.every(os.path.join(self.dirs["failed"], name)))
            count += sum(self._discard(folder, n) for folder, n in every)
        self._listings.clear()
        _bump(self.root)
        return count

    # -- dead letters (failed.py) --

    def _bury(self, lease: _Lease) -> None:
        """File the leased task as a dead letter: its hint first (durable when the queue
        is), then the one rename that makes it dead."""
        failed_us, sid = _ready_time(), lease.ready.sid
        rel = dead_letters.dead_rel(lease.queue, failed_us, sid)
        self.hints.point(sid, lease.queue, failed_us)
        top = self._dir("failed", lease.queue)
        rename_into(self._leased(lease.name), os.path.join(self.dirs["failed"], rel), top,
                    self._sync)

    def _buried(self, path: str) -> None:
        """The dead letter at `path` was removed: its hint and emptied folders go too."""
        parsed = dead_letters.parse_dead(os.path.basename(path))
        if parsed is None:
            return  # filed by an older OmniQ: no hint, no folders
        queue = os.path.relpath(path, self.dirs["failed"]).split(os.sep)[0]
        self.hints.drop(parsed[1], queue, parsed[0])
        dead_letters.prune(os.path.dirname(path), os.path.join(self.dirs["failed"], queue))

    def failed(
        self, queue: str | None, since_us: int | None, before_us: int | None, limit: int
    ) -> list[FailedTask]:
        """Newest failure first, reading folders only as far as `limit` takes it."""
        if limit <= 0:
            return []
        queues = [queue] if queue is not None else _listdir(self.dirs["failed"])
        streams = [self._newest(name, since_us, before_us) for name in queues]
        found: list[FailedTask] = []
        for dead in heapq.merge(*streams, key=lambda d: d.failed_us, reverse=True):
            data = read_quiet(dead.path)
            if data is None:
                continue  # retried or forgotten since it was listed
            task, _ = decode_task_or_placeholder(data, self._task_id(dead.sid), dead.queue)
            found.append(FailedTask(task, utc(dead.failed_us)))
            if len(found) >= limit:
                break
        return found

    def _newest(
        self, queue: str, since_us: int | None, before_us: int | None
    ) -> Iterator[dead_letters.Dead]:
        top = os.path.join(self.dirs["failed"], queue)
        names = _listdir(top)
        if any(dead_letters.is_legacy(n) for n in names):  # an older OmniQ runs beside us
            self._file_legacy(queue)
            names = _listdir(top)
        return dead_letters.newest(top, queue, since_us, before_us, names)

    def forget(self, task_ids: Sequence[str]) -> int:
        count = 0
        for task_id in dict.fromkeys(task_ids):
            spot = self._dead_spot(sid_of(task_id))
            if spot is not None:
                count += self._discard(os.path.dirname(spot.path), os.path.basename(spot.path))
        return count

    # -- named records --

    def _record(self, kind: str, name: str) -> str:
        return os.path.join(self.dirs["records"], kind, name)

    def put_record(self, kind: str, name: str, data: bytes) -> None:
        tmp = write_tmp(self.dirs["tmp"], data, self.durable)
        try:  # a rename replaces the old record whole: readers see one or the other
            rename_into(tmp, self._record(kind, name), self.dirs["records"], self._sync)
        except BaseException:
            unlink_quiet(tmp)
            raise

    def get_record(self, kind: str, name: str) -> bytes | None:
        return read_quiet(self._record(kind, name))

    def list_records(self, kind: str) -> list[tuple[str, bytes]]:
        """One listing (none there: one failed listing) and a read per record."""
        folder = os.path.join(self.dirs["records"], kind)
        found = ((name, read_quiet(os.path.join(folder, name))) for name in _listdir(folder))
        return [(name, data) for name, data in found if data is not None]

    def delete_record(self, kind: str, name: str) -> bool:
        try:
            os.unlink(self._record(kind, name))
        except FileNotFoundError:
            return False
        self._sync(os.path.dirname(self._record(kind, name)))
        return True

    # -- worker registry --

    def _worker_path(self, worker_id: str) -> str:
        return os.path.join(self.dirs["workers"], sid_of(worker_id) + ".json")

    def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        tmp = write_tmp(self.dirs["tmp"], encode_worker(info), durable=False)
        until = time.time() + ttl
        os.utime(tmp, (until, until))  # the mtime is the expiry; rename keeps it
        os.replace(tmp, self._worker_path(info.worker_id))

    def unregister_worker(self, worker_id: str) -> None:
        unlink_quiet(self._worker_path(worker_id))

    def workers(self) -> list[WorkerInfo]:
        now = time.time()
        found = []
        for name in _listdir(self.dirs["workers"]):
            path = os.path.join(self.dirs["workers"], name)
            until = _mtime(path)
            if until is None:
                continue
            if until <= now - TMP_MAX_AGE:
                unlink_quiet(path)  # long dead; a live worker would have refreshed it
            data = read_quiet(path) if until > now else None
            if data is not None:
                with contextlib.suppress(CorruptRecord):  # a bad file hides one worker only
                    found.append(decode_worker(data))
        return sorted(found, key=lambda w: w.worker_id)



# --- the queue handle ----------------------------------------------------------------------


def refuse_remote(base_dir: str | os.PathLike[str]) -> ConfigError:
    return ConfigError(
        f"the file queue cannot use {redact(os.fspath(base_dir))!r}: a queue needs "
        "atomic rename, which object stores lack; use the sqlite, redis, postgres or "
        "nats queue, or a local/NFS path"
    )


async def wait_for_tasks(
    root: str,
    signal: LocalSignal,
    timeout: float,
    poll_interval: float,
    attempt: Callable[[], Awaitable[list[T]]],
) -> list[T]:
    """`attempt()` until it finds something or `timeout` passes: woken at once by changes
    from this process, polling (with a growing pause) for other processes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, timeout)
    backoff = PollingBackoff(first=0.005, most=poll_interval)
    while True:
        seen = generation(root)
        got = await attempt()
        if got:
            return got
        remaining = deadline - loop.time()
        if remaining <= 0:
            return []
        if generation(root) != seen:
            continue  # this process changed the queue while we looked: look again
        if await signal.wait("ready", min(backoff.next(), remaining)):
            backoff.reset()


def _local_backend_at(base_dir: str | os.PathLike[str], durable: bool) -> LocalFileBackend:
    from .backend import local_backend_at  # (that module builds this store: imported on use)

    return local_backend_at(base_dir, durable)


class FileQueue:
    """A queue of files on a local or NFS-mounted POSIX filesystem (needs atomic rename)."""

    backend: LocalFileBackend

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        durable: bool = True,
        poll_interval: float = 0.25,
    ) -> None:
        if local_path(base_dir) is None:
            raise refuse_remote(base_dir)
        self.backend = _local_backend_at(base_dir, durable)
        self._poll_interval = poll_interval

    @classmethod
    def on(cls, backend: LocalFileBackend, poll_interval: float = 0.25) -> FileQueue:
        store = cls.__new__(cls)
        store.backend, store._poll_interval = backend, poll_interval
        return store

    @property
    def root(self) -> str:
        return self.backend.root

    def translate(self, exc: BaseException) -> OmniQError | None:
        return self.backend.translate(exc)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.backend.on_box(fn, *args)

    async def open(self) -> None:
        self.backend.attach(self)
        await self._call(lambda box: None)

    async def close(self) -> None:
        await self.backend.detach(self)

    async def enqueue(self, task: Task) -> str:
        task_id = await self._call(Maildir.enqueue, task)
        self.backend.signal.notify("ready")
        return task_id

    async def dequeue(
        self, queues: Sequence[str], lease: float, timeout: float
    ) -> Delivery | None:
        got = await self.dequeue_many(queues, lease, timeout, 1)
        return got[0] if got else None

    async def dequeue_many(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int
    ) -> list[Delivery]:
        names = list(queues)
        return await wait_for_tasks(
            self.root, self.backend.signal, timeout, self._poll_interval,
            lambda: self._call(Maildir.claim, names, lease, limit),
        )

    async def ack(self, delivery: Delivery, *, failed: bool = False) -> bool:
        return await self._call(Maildir.ack, delivery.receipt, delivery.task, failed)

    async def retry(self, delivery: Delivery, delay: float) -> bool:
        retried = await self._call(Maildir.retry, delivery.receipt, delay)
        if retried:
            self.backend.signal.notify("ready")
        return retried

    async def release(self, delivery: Delivery, delay: float = 0.0) -> None:
        await self._call(Maildir.release, delivery.receipt, delay)
        self.backend.signal.notify("ready")

    async def extend(self, delivery: Delivery, lease: float) -> bool:
        return await self._call(Maildir.extend, delivery.receipt, lease)

    async def cancel(self, task_id: str) -> bool:
        return await self._call(Maildir.cancel, task_id)

    async def get_task(self, task_id: str) -> Task | None:
        return await self._call(Maildir.get_task, task_id)

    async def stats(self) -> list[QueueStats]:
        return await self._call(Maildir.stats)

    async def purge(self, queue: str | None = None) -> int:
        return await self._call(Maildir.purge, queue)

    async def failed(
        self,
        queue: str | None = None,
        since: datetime | None = None,
        before: datetime | None = None,
        limit: int = 100,
    ) -> list[FailedTask]:
        if queue is not None:
            check_queue_name(queue)
        since_us = None if since is None else us(since)
        before_us = None if before is None else us(before)
        return await self._call(Maildir.failed, queue, since_us, before_us, limit)

    async def forget(self, task_ids: Sequence[str]) -> int:
        return await self._call(Maildir.forget, list(task_ids)) if task_ids else 0

    async def put_record(self, kind: str, name: str, data: bytes) -> None:
        check_record_name(kind, name)
        await self._call(Maildir.put_record, kind, name, bytes(data))

    async def get_record(self, kind: str, name: str) -> bytes | None:
        check_record_name(kind, name)
        return await self._call(Maildir.get_record, kind, name)

    async def list_records(self, kind: str) -> list[tuple[str, bytes]]:
        check_record_name(kind, "x")  # (the kind is a folder name: checked like a name)
        return await self._call(Maildir.list_records, kind)

    async def delete_record(self, kind: str, name: str) -> bool:
        check_record_name(kind, name)
        return await self._call(Maildir.delete_record, kind, name)

    async def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        await self._call(Maildir.register_worker, info, ttl)

    async def unregister_worker(self, worker_id: str) -> None:
        await self._call(Maildir.unregister_worker, worker_id)

    async def workers(self) -> list[WorkerInfo]:
        return await self._call(Maildir.workers)
