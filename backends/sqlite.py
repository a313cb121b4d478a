"""SQLite stores for all three roles: the zero-config default, shared safely by many processes.

One `SQLiteBackend` per directory and process (OMNIQ_HOME holds queue.db, results.db and
events.db) owns one store thread and one connection with the role files ATTACHed, so a
fused submit / claim / finish is one call to that thread and one transaction.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from omniq.backend import parse_settings, shared
from omniq.errors import BackendError, BackendUnavailable, ConfigError, OmniQError
from omniq.models import (
    Delivery,
    FailedTask,
    QueueStats,
    Task,
    TaskEvent,
    TaskResult,
    WorkerInfo,
    check_record_name,
    from_timestamp,
)
from omniq.registry import Role
from omniq.serialization import (
    decode_event,
    decode_result,
    decode_task_or_placeholder,
    decode_worker,
    encode_event,
    encode_result,
    encode_task,
    encode_worker,
)
from omniq.storage import (
    EventStorage,
    LocalSignal,
    NumberedCursors,
    PollingBackoff,
    ResultStorage,
    TaskQueue,
    poll_for_result,
    runs_now,
    started_event,
)
from omniq.threads import Job, Outcome, Threads

T = TypeVar("T")

DEFAULT_BUSY_TIMEOUT = 10.0
# Beyond SQLite's own busy handler we retry whole operations for this many
# busy timeouts, so a long checkpoint or WAL recovery elsewhere never surfaces.
_BUSY_ROUNDS = 3
_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_UNAVAILABLE_CODES = {
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_PERM,
}
# A checkpoint copies the WAL into the database file and syncs it. The store thread
# checkpoints inside a commit once the WAL holds _WAL_CHECKPOINT_PAGES (16 MB: measured
# 30-40% cheaper small commits than 4 MB), which stalled it 40-120 ms each time here;
# a thread of its own checkpoints (PASSIVE: never waiting for a lock) after every
# _CHECKPOINT_EVERY writes, so the store thread's own checkpoint finds little to copy:
# in a 3000-task drain, store-thread stalls over 10 ms went from 7-8 (90-111 ms in all)
# to none, and its time per task from 170-190 us to 158 us; the WALs stay at ~16 MB.
_WAL_CHECKPOINT_PAGES = 4000
_CHECKPOINT_EVERY = 250
_BATCH_MOST = 64  # calls per batch: bounds the wait of the first one
_CLEANUP_CHUNK = 5000  # rows per delete statement of a cleanup
_CURSOR_WIDTH = 16  # zero-padded rowids: cursors also sort as strings
_FILE_NAMES: dict[Role, str] = {
    "queue": "queue.db",
    "results": "results.db",
    "events": "events.db",
}

# A handed-back task's ready_at is shifted below every clock time by this (2^40 s), so
# it goes first (_HAND_BACK).
_RELEASED_SHIFT = float(2**40)

# SQL below names each table with its role's schema: {q}, {r} and {e} become the names
# under which the queue, results and events files are attached (SQLiteBackend.sql).


# --- schema ----------------------------------------------------------------


@dataclass(frozen=True)
class _Schema:
    """Versioned DDL of one store; steps[i] migrates version i to i + 1.

    Versions live per component in `omniq_schema`, so several roles may share a file.
    `{s}` in a statement is the schema (attached file) it runs in.
    """

    component: str
    steps: tuple[tuple[str, ...], ...]

    @property
    def version(self) -> int:
        return len(self.steps)


_META_DDL = (
    "CREATE TABLE IF NOT EXISTS {s}.omniq_schema "
    "(component TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID"
)

_QUEUE_SCHEMA = _Schema(
    "queue",
    (
        (
            # Clustered on the task id (no separate rowid tree): ack and lookups by
            # id touch one b-tree less. ready_at is the enqueue time (or ETA / retry
            # time), so ORDER BY priority DESC, ready_at, id is "higher, then older".
            """CREATE TABLE {s}.omniq_tasks (
                id TEXT PRIMARY KEY,
                queue TEXT NOT NULL,
                state INTEGER NOT NULL,  -- 0 waiting, 1 running, 2 dead letter
                priority INTEGER NOT NULL,
                ready_at REAL NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                lease_until REAL,
                token INTEGER NOT NULL DEFAULT 0,
                unique_key TEXT,
                data BLOB NOT NULL) WITHOUT ROWID""",
            "CREATE INDEX {s}.omniq_tasks_claim ON omniq_tasks "
            "(queue, priority DESC, ready_at) WHERE state = 0",
            "CREATE INDEX {s}.omniq_tasks_lease ON omniq_tasks (lease_until) WHERE state = 1",
            "CREATE UNIQUE INDEX {s}.omniq_tasks_unique ON omniq_tasks (unique_key) "
            "WHERE unique_key IS NOT NULL",
            """CREATE TABLE {s}.omniq_workers (
                worker_id TEXT PRIMARY KEY,
                expires_at REAL NOT NULL,
                data BLOB NOT NULL) WITHOUT ROWID""",
        ),
        (
            # Lease expiry by heartbeat progress, not by wall-clock deadlines: `extend`
            # raises `beat`, and `lease` is the length the holder asked for (NULL on
            # rows claimed before this step: the reaper's own lease length is used).
            "ALTER TABLE {s}.omniq_tasks ADD COLUMN beat INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE {s}.omniq_tasks ADD COLUMN lease REAL",
            # Unique keys of finished tasks, held for their unique_ttl (wall clock:
            # "nightly-2030-01-31" is a calendar promise). Keys of unfinished tasks
            # stay in omniq_tasks.unique_key.
            """CREATE TABLE {s}.omniq_unique_held (
                unique_key TEXT PRIMARY KEY,
                task_id TEXT NOT NULL,
                until REAL NOT NULL) WITHOUT ROWID""",
            "CREATE INDEX {s}.omniq_unique_held_until ON omniq_unique_held (until)",
        ),
        (
            # When a dead letter failed, in microseconds since the epoch (exact: what
            # failed() compares is what it returns). Dead letters of older versions get
            # the time they last became ready, the closest this file knows.
            "ALTER TABLE {s}.omniq_tasks ADD COLUMN failed_at INTEGER",
            "UPDATE {s}.omniq_tasks SET failed_at = CAST(round((CASE WHEN ready_at < 0 THEN "
            f"ready_at + {_RELEASED_SHIFT} ELSE ready_at END) * 1e6) AS INTEGER) WHERE state = 2",
            # failed(): newest first through these, over dead letters only.
            "CREATE INDEX {s}.omniq_tasks_failed ON omniq_tasks (failed_at) WHERE state = 2",
            "CREATE INDEX {s}.omniq_tasks_failed_queue ON omniq_tasks (queue, failed_at) "
            "WHERE state = 2",
            # An older OmniQ still running beside this one (it opened the file before the
            # upgrade) makes dead letters without a failure time: this gives them one, in
            # milliseconds (SQLite's 'now'). Ours set it (the trigger's WHEN is false).
            """CREATE TRIGGER {s}.omniq_tasks_failed_at AFTER UPDATE OF state ON omniq_tasks
                WHEN NEW.state = 2 AND NEW.failed_at IS OLD.failed_at BEGIN
                UPDATE omniq_tasks SET failed_at = 1000 * CAST(round(
                    (julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)
                WHERE id = NEW.id;
                END""",
            # Named records beside the queue: schedules, their state, cancel requests.
            """CREATE TABLE {s}.omniq_records (
                kind TEXT NOT NULL,
                name TEXT NOT NULL,
                data BLOB NOT NULL,
                PRIMARY KEY (kind, name)) WITHOUT ROWID""",
        ),
    ),
)

_RESULTS_SCHEMA = _Schema(
    "results",
    (
        (
            """CREATE TABLE {s}.omniq_results (
                task_id TEXT PRIMARY KEY,
                expires_at REAL,
                finished_at REAL NOT NULL,
                data BLOB NOT NULL) WITHOUT ROWID""",
            "CREATE INDEX {s}.omniq_results_expiry ON omniq_results (expires_at) "
            "WHERE expires_at IS NOT NULL",
            "CREATE INDEX {s}.omniq_results_finished ON omniq_results (finished_at)",
        ),
    ),
)

_EVENTS_SCHEMA = _Schema(
    "events",
    (
        (
            # AUTOINCREMENT: ids are never reused after cleanup, so cursors stay valid.
            """CREATE TABLE {s}.omniq_events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                task_id TEXT NOT NULL,
                ts REAL NOT NULL,
                data BLOB NOT NULL)""",
            "CREATE INDEX {s}.omniq_events_task ON omniq_events (task_id)",
            "CREATE INDEX {s}.omniq_events_ts ON omniq_events (ts)",
        ),
        (
            # The writer's event id: a copy sent again is dropped by the unique index.
            # Rows written before this step keep NULL (NULLs never collide) and read
            # with the stable legacy id serialization derives from their content.
            "ALTER TABLE {s}.omniq_events ADD COLUMN event_id TEXT",
            "CREATE UNIQUE INDEX {s}.omniq_events_event_id ON omniq_events (event_id)",
        ),
    ),
)

_SCHEMAS: dict[Role, _Schema] = {
    "queue": _QUEUE_SCHEMA,
    "results": _RESULTS_SCHEMA,
    "events": _EVENTS_SCHEMA,
}


def _installed_version(conn: sqlite3.Connection, component: str, schema: str) -> int:
    try:
        row = conn.execute(
            f"SELECT version FROM {schema}.omniq_schema WHERE component = ?", (component,)
        ).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return 0
        raise
    return int(row[0]) if row else 0


def _ensure_schema(conn: sqlite3.Connection, schema: _Schema, name: str, path: str) -> None:
    """Create or migrate `schema` in the attached file `name`."""
    if _installed_version(conn, schema.component, name) == schema.version:
        return  # the common case: no write lock taken on open
    with _immediate(conn):
        conn.execute(_META_DDL.format(s=name))
        found = _installed_version(conn, schema.component, name)
        if found > schema.version:
            raise BackendError(
                f"SQLite database {path} holds a newer OmniQ {schema.component} schema "
                f"(version {found}; this OmniQ reads up to {schema.version}): upgrade OmniQ"
            )
        for step in schema.steps[found:]:
            for statement in step:
                conn.execute(statement.format(s=name))
        conn.execute(
            f"INSERT OR REPLACE INTO {name}.omniq_schema (component, version) VALUES (?, ?)",
            (schema.component, schema.version),
        )


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """All-or-nothing for a multi-statement operation. On its own it is a write
    transaction that takes the locks up front (no deadlock on upgrade); inside a
    group commit it is a savepoint, so a failure undoes this operation only."""
    nested = conn.in_transaction
    conn.execute("SAVEPOINT omniq_op" if nested else "BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if nested and conn.in_transaction:
            conn.execute("ROLLBACK TO omniq_op")
            conn.execute("RELEASE omniq_op")
        elif conn.in_transaction:
            conn.rollback()
        raise
    conn.execute("RELEASE omniq_op" if nested else "COMMIT")


# --- errors, signals, settings ---------------------------------------------


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _BUSY_CODES
    text = str(exc)
    return "locked" in text or "busy" in text


def _translate(exc: sqlite3.Error, where: str) -> OmniQError:
    code = getattr(exc, "sqlite_errorcode", None)
    message = f"SQLite database {where}: {exc}"
    if _is_busy(exc) or (code is not None and (code & 0xFF) in _UNAVAILABLE_CODES):
        return BackendUnavailable(message)
    return BackendError(message)


def _is_special(path: str) -> bool:
    """`:memory:` or a `file:` URI: no directory to create, no file shared by name."""
    return path == ":memory:" or path.startswith("file:")


def _file_key(path: str) -> str:
    """What names one file in this process: two spellings of a path are one file."""
    return path if _is_special(path) else os.path.realpath(path)


_signals: dict[tuple[int, str], LocalSignal] = {}
_signals_lock = threading.Lock()


def _signal_for(key: str) -> LocalSignal:
    """One signal per database file and role in this process, shared by all handles."""
    full = (os.getpid(), key)
    with _signals_lock:
        signal = _signals.get(full)
        if signal is None:
            signal = _signals[full] = LocalSignal()
        return signal


@dataclass(frozen=True)
class SQLiteSettings:
    """One role's settings: its database file is `path`, else `base_dir`/<role>.db."""

    path: str | None = None
    base_dir: str | None = None
    options: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class SQLiteOptions:
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT


@dataclass(frozen=True, slots=True)
class _Op:
    """How the store thread runs a call: `writes` may share a commit with others;
    `solo` runs outside any transaction (VACUUM, a checkpoint); `where` names the file
    in error messages."""

    writes: bool
    where: str
    solo: bool = False


@dataclass(frozen=True)
class _File:
    """A database file attached under `name`, holding `roles`."""

    name: str
    path: str
    roles: tuple[Role, ...]


# --- the Backend: one thread, one connection, the role files attached ----------------

# Attach order is lock order and commit order. BEGIN IMMEDIATE write-locks every attached
# file in this order, and COMMIT writes each file's changes to its WAL in it: a result
# before its outcome event before the ack, an ENQUEUED event before its task (a process
# killed inside a COMMIT leaves a prefix of that). Every OmniQ process attaches in this
# one order, so processes never wait for each other's locks in a cycle. A file holding
# several roles takes the place of its first.
_ROLE_ORDER: tuple[Role, ...] = ("results", "events", "queue")
_PLACEHOLDERS: dict[Role, str] = {"queue": "q", "results": "r", "events": "e"}

S = TypeVar("S", bound="_SQLiteStore")
_Session = tuple[sqlite3.Connection, tuple[_File, ...]]


class SQLiteBackend:
    """The three roles in one directory (or any files given), for one process.

    One store thread and one connection: the role files are ATTACHed to it, so a fused
    claim / finish / submit is one call to the thread (each hop costs ~40 us of CPU and
    ~80 us of wall time here) and one transaction. Measured against three connections
    on the same thread, one transaction over the attached files costs 6-30% less per
    finish (result + event + ack: 80-100 us vs 90-111 us, WAL, synchronous=NORMAL). The
    price: a write transaction locks every attached file (measured ~10 us more for a
    submit or claim, which leave the results file alone), and another process's writer
    waits for all three at once; a claim, a finish and a submit all write the queue and
    the events anyway.

    The thread takes every call queued while it was busy as one batch: one loop wake-up
    per batch, and the batch's writes share one commit (measured: 2-4x tasks/s with 8
    concurrent callers). A second thread runs the WAL checkpoints (see
    _CHECKPOINT_EVERY). Stores of one directory share a Backend (`shared_backend`);
    files elsewhere get Backends of their own, and the worker then uses the generic path.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        files: Mapping[Role, str | os.PathLike[str]] | None = None,
    ) -> None:
        self.directory = os.fspath(directory)
        self.busy_timeout = float(busy_timeout)
        self._lock = threading.Lock()
        self._paths: dict[Role, str] = {}
        self._layout: tuple[_File, ...] = ()
        self._names = {mark: f"unbound_{role}" for role, mark in _PLACEHOLDERS.items()}
        self._sql: dict[str, str] = {}
        self._stores: dict[Role, _SQLiteStore] = {}
        self._users = 0
        self._sessions: dict[tuple[int, int], _Session] = {}  # (pid, thread) -> connection
        self._watch = _LeaseWatch()  # leases of this queue file, seen from this process
        self._fused = _Op(True, self.directory)
        self._threads = Threads(
            "omniq-sqlite", batch=self._run_batch, batch_most=_BATCH_MOST,
            on_exit=self._disconnect,
        )
        self._checkpoints = Threads(
            "omniq-sqlite-checkpoint", batch=self._checkpoint, on_exit=self._disconnect
        )
        self._writes = 0  # since the last checkpoint was asked for (store thread only)
        if files and not self.bind({role: os.fspath(path) for role, path in files.items()}):
            raise ConfigError("conflicting SQLite files")  # pragma: no cover - a fresh Backend

    def __repr__(self) -> str:
        return f"SQLiteBackend({self.directory!r}, files={self._paths!r})"

    # --- roles ---------------------------------------------------------------------

    def queue(self) -> TaskQueue:
        return self._role("queue", SQLiteQueue)

    def results(self) -> ResultStorage:
        return self._role("results", SQLiteResultStorage)

    def events(self) -> EventStorage:
        return self._role("events", SQLiteEventStorage)

    def bind(self, files: Mapping[Role, str]) -> bool:
        """Hold these role files; False (and nothing bound) when one of the roles
        already holds another file."""
        with self._lock:
            for role, path in files.items():
                held = self._paths.get(role)
                if held is not None and _file_key(held) != _file_key(path):
                    return False
            # Absolute: a later chdir must not attach another file.
            fresh = {
                role: path if _is_special(path) else os.path.abspath(path)
                for role, path in files.items() if role not in self._paths
            }
            if fresh:
                self._paths.update(fresh)
                self._layout = _layout(self._paths)
                for file in self._layout:
                    for role in file.roles:
                        self._names[_PLACEHOLDERS[role]] = file.name
                self._sql = {}
            return True

    def sql(self, template: str) -> str:
        """`template` with its tables named in the files this Backend attached."""
        text = self._sql.get(template)
        if text is None:
            text = self._sql[template] = template.format_map(self._names)
        return text

    def signal_key(self, role: Role) -> str:
        path = self._paths[role]
        return f"{role}:{id(self)}" if _is_special(path) else f"{role}:{_file_key(path)}"

    def translate(self, exc: BaseException) -> OmniQError | None:
        return _translate(exc, self.directory) if isinstance(exc, sqlite3.Error) else None

    def _role(self, role: Role, cls: type[S]) -> S:
        found = self._stores.get(role)
        if isinstance(found, cls):
            return found
        path = self._paths.get(role)
        if path is None:  # the role's default file (a private in-memory place: the same)
            special = _is_special(self.directory)
            path = self.directory if special else os.path.join(self.directory, _FILE_NAMES[role])
        return cls(path, backend=self)

    def _opened(self) -> None:
        with self._lock:
            self._users += 1

    def _closed(self, counted: bool) -> None:
        """A store closed: the last one stops the thread (which closes the connection);
        a later call starts them again."""
        with self._lock:
            self._users -= counted
            idle = self._users <= 0
        if idle:
            self._threads.shutdown(wait=True)
            self._checkpoints.shutdown(wait=True)

    # --- fused operations (omniq.storage.FusedOps): one call, one transaction ---------

    async def submit(self, task: Task, event: TaskEvent) -> str:
        task_id: str = await self._threads.submit(self._submit_job(task, event))
        self._submitted(task, task_id)
        return task_id

    def submit_blocking(self, task: Task, event: TaskEvent) -> str:
        """`submit` for a thread that may block (the sync `OmniQ`): the store thread
        answers it directly, without a trip through an event loop."""
        task_id: str = self._threads.call_blocking(self._submit_job(task, event))
        self._submitted(task, task_id)
        return task_id

    def _submit_job(self, task: Task, event: TaskEvent) -> Job[str]:
        return Job(self._submit_here, (_task_row(task), _event_row(event)), info=self._fused)

    def _submitted(self, task: Task, task_id: str) -> None:
        self._role("queue", SQLiteQueue)._signal.notify("ready")
        if task_id == task.id:
            self._role("events", SQLiteEventStorage)._signal.notify("new")

    async def claim(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int, worker_id: str
    ) -> list[Delivery]:
        if limit <= 0:
            return []
        queue = self._role("queue", SQLiteQueue)
        got = await queue._claim_waiting(tuple(queues), lease, timeout, limit, worker_id)
        if got:
            self._role("events", SQLiteEventStorage)._signal.notify("new")
        return got

    async def finish(
        self, delivery: Delivery, result: TaskResult, event: TaskEvent, *, failed: bool
    ) -> bool:
        args = (_result_row(result), _event_row(event), delivery.task_id, delivery.receipt,
                failed, _hold_of(delivery.task))
        stored, newly = await self._threads.submit(Job(self._finish_here, args, info=self._fused))
        if newly:
            self._role("results", SQLiteResultStorage)._signal.notify(result.task_id)
        if stored:
            self._role("events", SQLiteEventStorage)._signal.notify("new")
        return bool(stored)

    # -- on the store thread --

    def _submit_here(
        self, conn: sqlite3.Connection, row: _TaskRow, event: _EventRow
    ) -> str:
        with _immediate(conn):
            task_id = self._role("queue", SQLiteQueue)._enqueue_here(conn, row, time.time())
            if task_id == row[0]:  # a held unique key stores no event either
                conn.execute(self.sql(_INSERT_EVENT), event)
        return task_id

    def _started(
        self, conn: sqlite3.Connection, got: list[Delivery], worker_id: str
    ) -> list[Delivery]:
        """STARTED for each claimed task the worker will run; a task whose result is
        already stored (its worker died between the result and the ack) is acked
        instead of returned. Runs inside the claim's transaction."""
        queue = self._role("queue", SQLiteQueue)
        results = self._role("results", SQLiteResultStorage)
        kept = []
        for delivery in got:
            ok = None
            if delivery.attempt > 1 and delivery.problem is None:
                ok = results._stored_ok(conn, delivery.task_id)
            if ok is None:
                kept.append(delivery)
            else:
                hold = _hold_of(delivery.task)
                queue._ack_here(conn, delivery.task_id, delivery.receipt, not ok, hold)
        rows = [_event_row(started_event(d, worker_id)) for d in kept if runs_now(d)]
        if rows:
            conn.executemany(self.sql(_INSERT_EVENT), rows)
        return kept

    def _finish_here(
        self,
        conn: sqlite3.Connection,
        row: _ResultRow,
        event: _EventRow,
        task_id: str,
        token: int,
        failed: bool,
        hold: tuple[str, float] | None,
    ) -> tuple[bool, bool]:
        results = self._role("results", SQLiteResultStorage)
        with _immediate(conn):
            newly = results._store_here(conn, row)
            stored = newly or results._holds(conn, row)  # or a re-sent write of ours
            if stored:
                conn.execute(self.sql(_INSERT_EVENT), event)
            self._role("queue", SQLiteQueue)._ack_here(conn, task_id, token, failed, hold)
        return stored, newly

    # --- the store thread: batches, group commit, retries ------------------------------

    def _run_batch(self, jobs: list[Job[Any]]) -> list[Outcome]:
        self._writes += sum(job.info.writes for job in jobs)
        if self._writes >= _CHECKPOINT_EVERY:
            self._writes = 0
            self._checkpoints.post(Job(_noop, ()))
        shared_jobs = [job for job in jobs if not job.info.solo]
        if len(shared_jobs) == len(jobs):
            return self._run_shared(jobs)
        # Solo calls run after the others, each on its own (they were concurrent).
        outcomes = iter(self._run_shared(shared_jobs))
        return [self._attempt(job) if job.info.solo else next(outcomes) for job in jobs]

    def _checkpoint(self, jobs: list[Job[Any]]) -> list[Outcome]:
        """On the checkpoint thread, with a connection of its own: copy what the WALs
        hold into the files, without waiting for any lock (PASSIVE). Work left undone
        (a reader still needs old pages) is done by the next one."""
        with contextlib.suppress(sqlite3.Error, OmniQError):
            conn = self._connection()
            for file in self._layout:
                if not _is_special(file.path):
                    conn.execute(f"PRAGMA {file.name}.wal_checkpoint(PASSIVE)").fetchall()
        return [(True, None)] * len(jobs)

    def _run_shared(self, jobs: list[Job[Any]]) -> list[Outcome]:
        if sum(job.info.writes for job in jobs) >= 2:
            try:
                return self._run_grouped(jobs)
            except (sqlite3.Error, OmniQError):
                # Nothing of the group was kept: run each call on its own, with retries.
                self._rollback()
        return [self._attempt(job) for job in jobs]

    def _attempt(self, job: Job[Any]) -> Outcome:
        try:
            return True, self._with_retries(job)
        except BaseException as exc:
            return False, exc

    def _run_grouped(self, jobs: list[Job[Any]]) -> list[Outcome]:
        """Group commit: one write transaction for the batch. A failing call is
        undone alone (single statements are atomic, multi-statement calls use a
        savepoint); if SQLite aborted the whole transaction the group is rerun."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        outcomes: list[Outcome] = []
        for job in jobs:
            try:
                outcomes.append((True, job.fn(conn, *job.args)))
            except sqlite3.Error as exc:
                outcomes.append((False, _translate(exc, job.info.where)))
            except Exception as exc:
                outcomes.append((False, exc))
            if not conn.in_transaction:
                raise BackendError("group transaction aborted")
        conn.execute("COMMIT")
        return outcomes

    def _with_retries(self, job: Job[T]) -> T:
        """Run `job.fn(conn, *job.args)`, retrying the whole call while a file is busy."""
        patience = time.monotonic() + self.busy_timeout * _BUSY_ROUNDS
        pause = 0.001
        while True:
            try:
                return job.fn(self._connection(), *job.args)
            except sqlite3.Error as exc:
                self._rollback()
                if not _is_busy(exc) or time.monotonic() >= patience:
                    raise _translate(exc, job.info.where) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, with every bound file attached in order."""
        key = (os.getpid(), threading.get_ident())
        layout = self._layout
        session = self._sessions.get(key)
        if session is not None:
            if session[1] == layout:
                return session[0]
            self._disconnect()  # a role was bound since: attach afresh, in order
        conn = sqlite3.connect(":memory:", timeout=self.busy_timeout, isolation_level=None,
                               uri=True)  # explicit transactions only; file: URIs attach
        try:
            conn.execute(f"PRAGMA wal_autocheckpoint={_WAL_CHECKPOINT_PAGES}")
            for file in layout:
                _attach(conn, file)
        except BaseException:
            conn.close()
            raise
        self._sessions[key] = (conn, layout)
        return conn

    def _rollback(self) -> None:
        session = self._sessions.get((os.getpid(), threading.get_ident()))
        if session is not None and session[0].in_transaction:
            with contextlib.suppress(sqlite3.Error):
                session[0].rollback()

    def _disconnect(self) -> None:
        """Close this thread's connection. A forked child never touches the ones it
        inherited (they stay in `_sessions` under the parent's pid): SQLite forbids
        using a connection across fork(), even to close it."""
        session = self._sessions.pop((os.getpid(), threading.get_ident()), None)
        if session is not None:
            with contextlib.suppress(sqlite3.Error):
                session[0].close()


def _layout(paths: Mapping[Role, str]) -> tuple[_File, ...]:
    """The files to attach, in _ROLE_ORDER; a file is named after the first role bound
    to it, so its name never changes."""
    files: dict[str, _File] = {}
    for role, path in paths.items():
        key = _file_key(path)
        found = files.get(key)
        files[key] = (
            _File(role, path, (role,)) if found is None
            else _File(found.name, found.path, (*found.roles, role))
        )
    rank = {role: i for i, role in enumerate(_ROLE_ORDER)}
    return tuple(sorted(files.values(), key=lambda f: min(rank[r] for r in f.roles)))


def _attach(conn: sqlite3.Connection, file: _File) -> None:
    if not _is_special(file.path):
        try:
            Path(file.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(
                f"cannot create the directory of SQLite database {file.path}: "
                f"{exc.strerror or exc}"
            ) from None
    name = file.name
    try:
        conn.execute(f"ATTACH DATABASE ? AS {name}", (file.path,))
        # Only takes effect on a new file (before its first table): deleted rows'
        # pages can then be handed back to the file system (_give_space_back).
        conn.execute(f"PRAGMA {name}.auto_vacuum=INCREMENTAL")
        conn.execute(f"PRAGMA {name}.journal_mode=WAL")
        conn.execute(f"PRAGMA {name}.synchronous=NORMAL")
        for role in file.roles:
            _ensure_schema(conn, _SCHEMAS[role], name, file.path)
    except sqlite3.Error as exc:
        if _is_busy(exc):
            raise  # retried
        raise _translate(exc, file.path) from None


def shared_backend(
    files: Mapping[Role, str], busy_timeout: float = DEFAULT_BUSY_TIMEOUT
) -> SQLiteBackend:
    """The process's Backend for these role files: one per directory, unless one of the
    roles there already holds another file (a second file set in one directory)."""
    first = next(iter(files.values()))
    if any(_is_special(path) for path in files.values()):
        return SQLiteBackend(first, busy_timeout=busy_timeout, files=files)  # never shared
    directory = os.path.dirname(_file_key(first))
    n = 0
    while True:
        backend = shared(
            ("sqlite", directory, busy_timeout, n),
            lambda: SQLiteBackend(directory, busy_timeout=busy_timeout),
        )
        if backend.bind(files):
            return backend
        n += 1


# --- the stores: views of one role of a Backend ------------------------------------------


class _SQLiteStore:
    """One role's file, served by its Backend's thread and connection."""

    role: ClassVar[Role]

    def __init__(
        self,
        database_path: str | os.PathLike[str],
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        backend: SQLiteBackend | None = None,
    ) -> None:
        path = os.fspath(database_path)
        if backend is None:
            backend = shared_backend({self.role: path}, float(busy_timeout))
        elif not backend.bind({self.role: path}):
            raise ConfigError(
                f"the SQLite backend of {backend.directory} keeps its {self.role} in "
                f"another file than {path}"
            )
        self.database_path = path
        self.backend = backend
        backend._stores.setdefault(self.role, self)
        self._sql = backend.sql
        self._reads = _Op(False, path)
        self._writes = _Op(True, path)
        self._signal_key = backend.signal_key(self.role)
        self._counted = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(database_path={self.database_path!r})"

    @property
    def busy_timeout(self) -> float:
        return self.backend.busy_timeout

    @property
    def _signal(self) -> LocalSignal:
        return _signal_for(self._signal_key)

    @property
    def _name(self) -> str:
        return self._sql("{" + _PLACEHOLDERS[self.role] + "}")

    def translate(self, exc: BaseException) -> OmniQError | None:
        return _translate(exc, self.database_path) if isinstance(exc, sqlite3.Error) else None

    async def open(self) -> None:
        if not self._counted:
            self._counted = True
            self.backend._opened()
        await self._call(_noop)

    async def close(self) -> None:
        counted, self._counted = self._counted, False
        self.backend._closed(counted)

    def _call(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run a read on the Backend's thread."""
        return self.backend._threads.submit(Job(fn, args, info=self._reads))

    def _write(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run a write; concurrent writes may share one commit."""
        return self.backend._threads.submit(Job(fn, args, info=self._writes))

    async def _give_space_back(self, always_convert: bool) -> None:
        """After deletes: hand free pages back to the file system and empty the WAL."""
        op = _Op(True, self.database_path, solo=True)
        await self.backend._threads.submit(
            Job(_give_space_back, (self._name, always_convert), info=op)
        )

    async def _delete_in_chunks(self, template: str, params: tuple[Any, ...]) -> int:
        # Chunks keep each write lock short, so other processes never wait long on a purge.
        sql = self._sql(template)
        total = 0
        while True:
            count = await self._write(_execute, sql, params)
            total += count
            if count < _CLEANUP_CHUNK:
                break
        if total:
            # The worker runs cleanups too: a file made before incremental auto-vacuum
            # is converted here only while its VACUUM stays short (see _give_space_back).
            await self._give_space_back(always_convert=False)
        return total


def _noop(conn: sqlite3.Connection) -> None:
    return None


# Ids per `IN (...)` statement: under SQLite's oldest default limit of 999 variables.
_IDS_PER_STATEMENT = 500


def _chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(ids), _IDS_PER_STATEMENT):
        yield ids[i : i + _IDS_PER_STATEMENT]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _execute(conn: sqlite3.Connection, sql: str, params: Any) -> int:
    return conn.execute(sql, params).rowcount


def _fetchone(conn: sqlite3.Connection, sql: str, params: Any) -> Any:
    return conn.execute(sql, params).fetchone()


def _fetchall(conn: sqlite3.Connection, sql: str, params: Any) -> list[Any]:
    return conn.execute(sql, params).fetchall()


# A file made before incremental auto-vacuum is converted by one VACUUM: it copies every
# live page into a new file (disk space for a second copy, the write lock held meanwhile,
# about 1 s per 150 MB of live data measured here). `purge` (an operator's command) always
# pays it once; a cleanup (the worker runs those too) only while the live data is small.
_CONVERT_LIVE_MOST = 32 * 1024 * 1024


def _give_space_back(conn: sqlite3.Connection, name: str, always_convert: bool) -> None:
    if conn.execute(f"PRAGMA {name}.auto_vacuum").fetchone()[0] == 0:
        if always_convert or _live_bytes(conn, name) <= _CONVERT_LIVE_MOST:
            conn.execute(f"PRAGMA {name}.auto_vacuum=INCREMENTAL")  # applied by the VACUUM
            conn.execute(f"VACUUM {name}")
    else:
        # executescript steps the pragma to its end: execute() stops after one page,
        # since each freed page is a row without columns.
        conn.executescript(f"PRAGMA {name}.incremental_vacuum")
    _empty_wal(conn, name)


# A checkpoint refused at once (another connection's automatic checkpoint is running:
# SQLite does not wait for that one) is tried again this many times, 20 ms apart.
_CHECKPOINT_TRIES = 50


def _empty_wal(conn: sqlite3.Connection, name: str) -> None:
    """Empty the WAL (it keeps its largest size otherwise). Waits at most the busy
    timeout for readers of older snapshots; a checkpoint left busy is not an error."""
    for _ in range(_CHECKPOINT_TRIES):
        busy, _log, _done = conn.execute(f"PRAGMA {name}.wal_checkpoint(TRUNCATE)").fetchone()
        if not busy:
            return
        time.sleep(0.02)


def _live_bytes(conn: sqlite3.Connection, name: str) -> int:
    pages = conn.execute(f"PRAGMA {name}.page_count").fetchone()[0]
    free = conn.execute(f"PRAGMA {name}.freelist_count").fetchone()[0]
    size = conn.execute(f"PRAGMA {name}.page_size").fetchone()[0]
    return int((pages - free) * size)


# --- queue ------------------------------------------------------------------

# One UPDATE ... RETURNING claims a batch: it takes the write lock before it reads, so
# two consumers can never claim the same row. RETURNING does not keep the subquery's
# order: the rows are sorted again (_claim_order). Each claim draws a random 63-bit
# token (the receipt that fences its settlements), so the receipts of one batch differ
# and a claim never gets the token of an earlier one (odds 2^-63).
_CLAIM = (
    "UPDATE {q}.omniq_tasks SET state = 1, attempts = attempts + 1, lease_until = ?, "
    "lease = ?, token = random() & 9223372036854775807 "
    "WHERE id IN (SELECT id FROM {q}.omniq_tasks "
    "WHERE queue = ? AND state = 0 AND ready_at <= ? "
    "ORDER BY priority DESC, ready_at, id LIMIT ?) "
    "RETURNING id, data, attempts, token, beat, lease_until, priority, ready_at"
)
# Every running row (through the partial index on state = 1), for the lease watch.
_RUNNING_ROWS = (
    "SELECT id, token, beat, lease_until, coalesce(lease, ?) FROM {q}.omniq_tasks "
    "WHERE state = 1"
)
# A task handed back at once (released without a delay, or its lease ran out) goes
# before every task that has not run yet: its ready_at moves below all clock times, by
# _RELEASED_SHIFT, keeping the order among such tasks and telling since when it waits
# (stats). A release with a delay is not shifted: it waits its delay like a retry.
_HAND_BACK = (
    "state = 0, lease_until = NULL, lease = NULL, "
    f"ready_at = CASE WHEN ready_at >= 0 THEN ready_at - {_RELEASED_SHIFT} ELSE ready_at END"
)
# Hands a lease back only if the row is still exactly as the watch last saw it: a
# heartbeat or a new claim in between (any process) makes this change nothing.
_RECLAIM = (
    f"UPDATE {{q}}.omniq_tasks SET {_HAND_BACK} "
    "WHERE id = ? AND state = 1 AND token = ? AND beat = ? AND lease_until IS ?"
)
# Settlements act only while the delivery's token still holds the lease.
_HELD = "WHERE id = ? AND token = ? AND state = 1"
_RELEASE = (
    f"UPDATE {{q}}.omniq_tasks SET {_HAND_BACK}, attempts = max(attempts - 1, 0) {_HELD}"
)
_RETRY = (
    "UPDATE {q}.omniq_tasks SET state = 0, ready_at = ?, lease_until = NULL, lease = NULL "
    f"{_HELD}"
)
_EXTEND = f"UPDATE {{q}}.omniq_tasks SET lease_until = ?, lease = ?, beat = beat + 1 {_HELD}"
_ACK = f"DELETE FROM {{q}}.omniq_tasks {_HELD}"
# A dead letter's key leaves omniq_tasks: it is freed, or held in omniq_unique_held.
_ACK_FAILED = (
    "UPDATE {q}.omniq_tasks SET state = 2, failed_at = ?, lease_until = NULL, lease = NULL, "
    f"unique_key = NULL {_HELD}"
)
# Back after a delay (a task waiting for others): not shifted, so it waits its delay.
_RELEASE_LATER = (
    "UPDATE {q}.omniq_tasks SET state = 0, ready_at = ?, lease_until = NULL, lease = NULL, "
    f"attempts = max(attempts - 1, 0) {_HELD}"
)
_PROBE_READY = (
    "SELECT 1 FROM {q}.omniq_tasks WHERE queue = ? AND state = 0 AND ready_at <= ? LIMIT 1"
)
# Idempotent by id: an unfinished task is left alone, a dead letter queued from scratch.
_UPSERT_TASK = (
    "INSERT INTO {q}.omniq_tasks (id, queue, state, priority, ready_at, unique_key, data) "
    "VALUES (?, ?, 0, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET queue = excluded.queue, "
    "state = 0, priority = excluded.priority, ready_at = excluded.ready_at, attempts = 0, "
    "lease_until = NULL, lease = NULL, unique_key = excluded.unique_key, data = excluded.data "
    "WHERE state = 2"
)
_KEY_HOLDER = (
    "SELECT id FROM {q}.omniq_tasks WHERE unique_key = ? UNION ALL "
    "SELECT task_id FROM {q}.omniq_unique_held WHERE unique_key = ? AND until > ? LIMIT 1"
)
_HOLD_KEY = (
    "INSERT OR REPLACE INTO {q}.omniq_unique_held (unique_key, task_id, until) "
    "VALUES (?, ?, ?)"
)
_PURGE_HELD = (
    "DELETE FROM {q}.omniq_unique_held WHERE task_id IN "
    "(SELECT id FROM {q}.omniq_tasks WHERE state = 2 AND (?1 IS NULL OR queue = ?1))"
)
_PURGE = "DELETE FROM {q}.omniq_tasks WHERE state != 1 AND (?1 IS NULL OR queue = ?1)"
# Dead letters newest first, through the failure-time indexes over dead letters only;
# INDEXED BY makes a statement that could not use its index fail instead of scanning.
# Measured here with 100k tasks of which 1k are dead letters (10 queues): a page of 100
# is one store call, 0.11 ms of SQL (the same query scanning every task: 14 ms) and
# 0.9 ms in all with the 100 tasks decoded; of one queue or paged by `before`, the same.
def _failed_sql(by_queue: bool, rest: str) -> str:
    index, where = (
        ("omniq_tasks_failed_queue", " AND queue = :queue") if by_queue
        else ("omniq_tasks_failed", "")
    )
    return (
        f"SELECT id, queue, failed_at, data FROM {{q}}.omniq_tasks INDEXED BY {index} "
        f"WHERE state = 2{where}{rest}"
    )


_FAILED_PAGE = {
    by_queue: _failed_sql(
        by_queue, " AND failed_at >= :since AND failed_at < :before "
        "ORDER BY failed_at DESC, id DESC LIMIT :limit"
    )
    for by_queue in (False, True)
}
# The rest of the group that shares the page's last failure time: a page never ends
# inside one (paging by before=page[-1].failed_at would skip the rest).
_FAILED_TIES = {
    by_queue: _failed_sql(by_queue, " AND failed_at = :at AND id < :last ORDER BY id DESC")
    for by_queue in (False, True)
}
_FORGET = (
    "DELETE FROM {q}.omniq_tasks WHERE state = 2 AND id IN ({{marks}}) RETURNING id, queue, data"
)
_PUT_RECORD = "INSERT OR REPLACE INTO {q}.omniq_records (kind, name, data) VALUES (?, ?, ?)"
_TIME_MOST = 2**62  # microseconds: beyond any datetime
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_STATS = (
    "SELECT queue, sum(state = 0 AND ready_at <= :now), sum(state = 0 AND ready_at > :now), "
    "sum(state = 1), sum(state = 2), min(CASE WHEN state = 0 AND ready_at <= :now THEN "
    "nullif(CASE WHEN ready_at < 0 THEN ready_at + :shift ELSE ready_at END, 0) END) "
    "FROM {q}.omniq_tasks GROUP BY queue ORDER BY queue"
)
# Polls of other processes' enqueues while a claim waits: 1 ms, growing by 1.2x to
# 100 ms. A batching worker has one claim waiting (not four, as with one task per
# call), so its polls must come that much closer: round trip p50 (tests/benchmarks/
# bench.py sqlite, 3 runs each) 5.9-6.3 ms with 3 ms x 1.5, 3.0-3.8 ms with this. An
# idle worker makes ~31 probes a second (each a read, no lock), about half of what four
# fetchers at 3 ms x 1.5 made.
# The loop's selector (epoll) sleeps whole milliseconds, rounding up (1.2 ms sleeps 2):
# pauses are rounded to the nearest one, so polls come when the schedule means them to
# (omniq.storage.poll_for_result does the same for result waits, which poll from 1 ms
# too). Both together, bench.py sqlite, 6 runs each: round trip p50 2.45-2.60 ms ->
# 1.75-2.57 (median 2.5 -> 1.9), p99 6.1-11 -> 3.8-7.9; enqueue and drain rates alike.
_QUEUE_WAIT_FIRST = 0.001
_QUEUE_WAIT_GROWTH = 1.2
_RECLAIM_EVERY = 1.0
_LOOK_GAP = 0.1
_QUEUE_WAIT_MOST = 0.1


def _whole_ms(pause: float) -> float:
    return max(0.001, round(pause, 3))


def _micros(value: datetime) -> int:
    """Microseconds since the epoch, exactly (a naive datetime is local time, as
    datetime.timestamp() reads it)."""
    if value.tzinfo is None:
        value = value.astimezone()
    return (value - _EPOCH) // _MICROSECOND


def _from_micros(value: int) -> datetime:
    return _EPOCH + value * _MICROSECOND


def _now_micros() -> int:
    return time.time_ns() // 1000


_Mark = tuple[int, int, float | None]  # (token, beat, lease_until) of a running row
_TaskRow = tuple[str, str, int, float, str | None, bytes]


def _task_row(task: Task) -> _TaskRow:
    ready_at = task.eta.timestamp() if task.eta else time.time()
    return (task.id, task.queue, task.priority, ready_at, task.unique_key, encode_task(task))


def _hold_of(task: Task) -> tuple[str, float] | None:
    """How long a finished task keeps its unique key (None: freed at once)."""
    if task.unique_key is None or not task.unique_ttl:
        return None
    return task.unique_key, time.time() + task.unique_ttl


def _claim_order(row: tuple[Any, ...]) -> tuple[int, float, str]:
    return -row[6], row[7], row[0]


class _LeaseWatch:
    """Lease expiry that survives clock steps: no process compares its wall clock with
    a deadline another process wrote.

    A holder proves it is alive by changing its row (`extend` raises `beat`). The watch
    remembers each running row's mark and when this process first saw it, by its own
    monotonic clock; the lease is over once the same mark has been seen unchanged for
    the row's lease length. Price: a watch that has just started waits a full lease
    before it hands back a dead holder's task. It looks every _RECLAIM_EVERY seconds,
    and sooner (but at most every _LOOK_GAP) when a lease it knows of may have run out.
    Touched on the store thread only.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[_Mark, float]] = {}
        self.expired: list[tuple[str, int, int, float | None]] = []
        self._due = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self._due

    def observe(self, rows: list[tuple[str, int, int, float | None, float]]) -> None:
        now = time.monotonic()
        seen: dict[str, tuple[_Mark, float]] = {}
        expired = []
        soonest = now + _RECLAIM_EVERY
        for task_id, token, beat, lease_until, lease in rows:
            mark = (token, beat, lease_until)
            old = self._seen.get(task_id)
            since = old[1] if old is not None and old[0] == mark else now
            seen[task_id] = (mark, since)
            if now - since >= lease:
                expired.append((task_id, *mark))
            else:
                soonest = min(soonest, since + lease)
        self._seen = seen  # rows no longer running are forgotten
        self.expired = expired
        self._due = max(soonest, now + _LOOK_GAP)

    def claimed(self, task_id: str, mark: _Mark, lease: float) -> None:
        now = time.monotonic()
        self._seen[task_id] = (mark, now)
        self._due = min(self._due, now + max(lease, _LOOK_GAP))

    def take_expired(self) -> list[tuple[str, int, int, float | None]]:
        # Forgotten once tried: if a rolled-back group undid the reclaim, the row is
        # still unchanged and the next look finds it expired again.
        expired, self.expired = self.expired, []
        return expired


class SQLiteQueue(_SQLiteStore):
    """A task queue in one SQLite file; a claim is one atomic UPDATE ... RETURNING.
    Dead letters stay in omniq_tasks (state 2), indexed by failure time; named records
    (schedules, cancel requests) live beside the tasks in omniq_records."""

    role = "queue"

    async def enqueue(self, task: Task) -> str:
        task_id: str = await self._write(self._enqueue_here, _task_row(task), time.time())
        self._signal.notify("ready")
        return task_id

    async def dequeue(
        self, queues: Sequence[str], lease: float, timeout: float
    ) -> Delivery | None:
        got = await self._claim_waiting(tuple(queues), lease, timeout, 1, None)
        return got[0] if got else None

    async def dequeue_many(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int
    ) -> list[Delivery]:
        if limit <= 0:
            return []
        return await self._claim_waiting(tuple(queues), lease, timeout, limit, None)

    async def _claim_waiting(
        self,
        names: tuple[str, ...],
        lease: float,
        timeout: float,
        limit: int,
        worker_id: str | None,
    ) -> list[Delivery]:
        """Claim up to `limit` (with STARTED events: `worker_id`), waiting up to
        `timeout` for the first. Other processes are seen by polling; this process
        wakes us at once."""
        got = await self._claim_call(names, lease, limit, worker_id, False)
        if got or timeout <= 0:
            return got
        deadline = time.monotonic() + timeout
        backoff = PollingBackoff(_QUEUE_WAIT_FIRST, _QUEUE_WAIT_MOST, _QUEUE_WAIT_GROWTH)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            await self._signal.wait("ready", min(_whole_ms(backoff.next()), remaining))
            got = await self._claim_call(names, lease, limit, worker_id, True)
            if got:
                return got

    async def _claim_call(
        self,
        names: tuple[str, ...],
        lease: float,
        limit: int,
        worker_id: str | None,
        probe: bool,
    ) -> list[Delivery]:
        # A caller cancelled while its claim ran (wait_for, shutdown) would strand the
        # tasks until their leases expired: such a claim is handed straight back.
        op = self._writes if worker_id is None else self.backend._fused
        job = Job(self._claim_here, (names, lease, limit, worker_id, probe), info=op,
                  orphan=self._give_back)
        return await self.backend._threads.call(job)

    def _give_back(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            args = (self._sql(_RELEASE), (delivery.task_id, delivery.receipt))
            self.backend._threads.post(Job(_execute, args, info=self._writes))
        if deliveries:
            self._signal.notify("ready")

    # -- claims, on the store thread --

    def _claim_here(
        self,
        conn: sqlite3.Connection,
        names: tuple[str, ...],
        lease: float,
        limit: int,
        worker_id: str | None,
        probe: bool,
    ) -> list[Delivery]:
        # A probe first (a read) keeps idle consumers from taking the write lock.
        if probe and not self._ready(conn, names, lease):
            return []
        if worker_id is None:
            return self._take(conn, names, lease, limit)
        with _immediate(conn):
            got = self._take(conn, names, lease, limit)
            return self.backend._started(conn, got, worker_id) if got else got

    def _ready(self, conn: sqlite3.Connection, names: tuple[str, ...], lease: float) -> bool:
        self._look(conn, lease)
        now = time.time()
        probe = self._sql(_PROBE_READY)
        return bool(self.backend._watch.expired) or any(
            conn.execute(probe, (name, now)).fetchone() is not None for name in names
        )

    def _take(
        self, conn: sqlite3.Connection, names: tuple[str, ...], lease: float, limit: int
    ) -> list[Delivery]:
        # The hot path stays one statement per queue: the watch looks at running rows
        # at most every _RECLAIM_EVERY seconds, and reclaims only what it found expired.
        # ready_at (ETAs, retry delays) is wall-clock time by nature; leases are not.
        watch = self.backend._watch
        self._look(conn, lease)
        for expired in watch.take_expired():
            conn.execute(self._sql(_RECLAIM), expired)
        now = time.time()
        claim = self._sql(_CLAIM)
        got: list[Delivery] = []
        for name in names:
            if len(got) >= limit:
                break
            rows = conn.execute(claim, (now + lease, lease, name, now, limit - len(got)))
            for task_id, data, attempts, token, beat, lease_until, *_ in sorted(
                rows.fetchall(), key=_claim_order
            ):
                watch.claimed(task_id, (token, beat, lease_until), lease)
                # A payload that does not decode is still delivered, for the worker to fail.
                task, problem = decode_task_or_placeholder(data, task_id, name)
                got.append(Delivery(task=task, attempt=attempts, receipt=token, problem=problem))
        return got

    def _look(self, conn: sqlite3.Connection, lease: float) -> None:
        watch = self.backend._watch
        if watch.due():
            watch.observe(conn.execute(self._sql(_RUNNING_ROWS), (lease,)).fetchall())

    # -- writes, on the store thread --

    def _enqueue_here(self, conn: sqlite3.Connection, row: _TaskRow, now: float) -> str:
        task_id, key = row[0], row[4]
        if key is None:
            conn.execute(self._sql(_UPSERT_TASK), row)
            return task_id
        with _immediate(conn):
            found = conn.execute(
                self._sql("SELECT state FROM {q}.omniq_tasks WHERE id = ?"), (task_id,)
            ).fetchone()
            if found is not None and found[0] != 2:
                return task_id  # unfinished: left alone
            holder = conn.execute(self._sql(_KEY_HOLDER), (key, key, now)).fetchone()
            if holder is not None and holder[0] != task_id:
                return str(holder[0])
            # The key is free (or held by this very task): the unfinished task holds it now.
            conn.execute(
                self._sql("DELETE FROM {q}.omniq_unique_held WHERE unique_key = ?"), (key,)
            )
            conn.execute(self._sql(_UPSERT_TASK), row)
        return task_id

    def _ack_here(
        self,
        conn: sqlite3.Connection,
        task_id: str,
        token: int,
        failed: bool,
        hold: tuple[str, float] | None,
    ) -> bool:
        params: tuple[Any, ...] = (task_id, token)
        settle = self._sql(_ACK)
        if failed:
            settle, params = self._sql(_ACK_FAILED), (_now_micros(), *params)
        if hold is None:
            return bool(conn.execute(settle, params).rowcount)
        with _immediate(conn):
            if not conn.execute(settle, params).rowcount:
                return False
            key, until = hold
            conn.execute(
                self._sql("DELETE FROM {q}.omniq_unique_held WHERE until <= ?"), (time.time(),)
            )
            conn.execute(self._sql(_HOLD_KEY), (key, task_id, until))
        return True

    def _purge_here(self, conn: sqlite3.Connection, queue: str | None) -> int:
        with _immediate(conn):
            # Purged dead letters free the keys they held for their unique_ttl.
            conn.execute(self._sql(_PURGE_HELD), (queue,))
            return int(conn.execute(self._sql(_PURGE), (queue,)).rowcount)

    def _forget_here(self, conn: sqlite3.Connection, task_ids: Sequence[str]) -> int:
        """Delete these dead letters and free the unique keys they hold (as purge)."""
        gone = 0
        with _immediate(conn):
            for chunk in _chunks(task_ids):
                sql = self._sql(_FORGET).format(marks=_marks(len(chunk)))
                rows = conn.execute(sql, chunk).fetchall()
                gone += len(rows)
                for task_id, queue, data in rows:
                    self._free_held(conn, task_id, queue, data)
        return gone

    def _free_held(self, conn: sqlite3.Connection, task_id: str, queue: str, data: bytes) -> None:
        # The key is in the payload only (the row's unique_key went with the failure);
        # by key the delete is a lookup, by task id (undecodable) a scan of held keys.
        task, problem = decode_task_or_placeholder(data, task_id, queue)
        if problem is not None:
            sql = self._sql("DELETE FROM {q}.omniq_unique_held WHERE task_id = ?")
            conn.execute(sql, (task_id,))
        elif task.unique_key is not None:
            sql = self._sql(
                "DELETE FROM {q}.omniq_unique_held WHERE unique_key = ? AND task_id = ?"
            )
            conn.execute(sql, (task.unique_key, task_id))

    def _failed_here(
        self, conn: sqlite3.Connection, params: dict[str, Any], by_queue: bool
    ) -> list[tuple[str, str, int, bytes]]:
        rows = conn.execute(self._sql(_FAILED_PAGE[by_queue]), params).fetchall()
        if rows and len(rows) >= params["limit"]:
            at, last = rows[-1][2], rows[-1][0]
            ties = self._sql(_FAILED_TIES[by_queue])
            rows += conn.execute(ties, {**params, "at": at, "last": last}).fetchall()
        return rows

    def _register_here(
        self, conn: sqlite3.Connection, worker_id: str, expires_at: float, data: bytes
    ) -> None:
        with _immediate(conn):
            conn.execute(
                self._sql("DELETE FROM {q}.omniq_workers WHERE expires_at <= ?"), (time.time(),)
            )
            conn.execute(
                self._sql(
                    "INSERT OR REPLACE INTO {q}.omniq_workers (worker_id, expires_at, data) "
                    "VALUES (?, ?, ?)"
                ),
                (worker_id, expires_at, data),
            )

    # -- the rest of the role --

    async def ack(self, delivery: Delivery, *, failed: bool = False) -> bool:
        hold = _hold_of(delivery.task)
        changed: bool = await self._write(
            self._ack_here, delivery.task_id, delivery.receipt, failed, hold
        )
        return changed

    async def retry(self, delivery: Delivery, delay: float) -> bool:
        params = (time.time() + delay, delivery.task_id, delivery.receipt)
        return await self._write(_execute, self._sql(_RETRY), params) > 0

    async def release(self, delivery: Delivery, delay: float = 0.0) -> None:
        held = (delivery.task_id, delivery.receipt)
        if delay > 0:  # nothing to claim before then: no one to wake
            await self._write(_execute, self._sql(_RELEASE_LATER), (time.time() + delay, *held))
        elif await self._write(_execute, self._sql(_RELEASE), held):
            self._signal.notify("ready")

    async def extend(self, delivery: Delivery, lease: float) -> bool:
        params = (time.time() + lease, lease, delivery.task_id, delivery.receipt)
        return await self._write(_execute, self._sql(_EXTEND), params) > 0

    async def cancel(self, task_id: str) -> bool:
        sql = self._sql("DELETE FROM {q}.omniq_tasks WHERE id = ? AND state = 0")
        return await self._write(_execute, sql, (task_id,)) > 0

    async def get_task(self, task_id: str) -> Task | None:
        sql = self._sql("SELECT data, queue FROM {q}.omniq_tasks WHERE id = ?")
        row = await self._call(_fetchone, sql, (task_id,))
        if row is None:
            return None
        task, _ = decode_task_or_placeholder(row[0], task_id, row[1])
        return task

    async def stats(self) -> list[QueueStats]:
        params = {"now": time.time(), "shift": _RELEASED_SHIFT}
        rows = await self._call(_fetchall, self._sql(_STATS), params)
        return [
            QueueStats(queue=q, queued=a, scheduled=b, running=c, failed=d,
                       oldest_ready_at=from_timestamp(oldest))
            for q, a, b, c, d, oldest in rows
        ]

    async def failed(
        self,
        queue: str | None = None,
        since: datetime | None = None,
        before: datetime | None = None,
        limit: int = 100,
    ) -> list[FailedTask]:
        if limit <= 0:
            return []
        params = {
            "queue": queue, "limit": limit,
            "since": -_TIME_MOST if since is None else _micros(since),
            "before": _TIME_MOST if before is None else _micros(before),
        }
        rows = await self._call(self._failed_here, params, queue is not None)
        return [
            FailedTask(decode_task_or_placeholder(data, task_id, name)[0], _from_micros(at))
            for task_id, name, at, data in rows
        ]

    async def forget(self, task_ids: Sequence[str]) -> int:
        if not task_ids:
            return 0
        gone: int = await self._write(self._forget_here, list(task_ids))
        return gone

    async def put_record(self, kind: str, name: str, data: bytes) -> None:
        check_record_name(kind, name)
        await self._write(_execute, self._sql(_PUT_RECORD), (kind, name, bytes(data)))

    async def get_record(self, kind: str, name: str) -> bytes | None:
        sql = self._sql("SELECT data FROM {q}.omniq_records WHERE kind = ? AND name = ?")
        row = await self._call(_fetchone, sql, (kind, name))
        return None if row is None else bytes(row[0])

    async def list_records(self, kind: str) -> list[tuple[str, bytes]]:
        # One read of the primary key's range: workers call it every second while busy.
        sql = self._sql("SELECT name, data FROM {q}.omniq_records WHERE kind = ? ORDER BY name")
        rows = await self._call(_fetchall, sql, (kind,))
        return [(name, bytes(data)) for name, data in rows]

    async def delete_record(self, kind: str, name: str) -> bool:
        sql = self._sql("DELETE FROM {q}.omniq_records WHERE kind = ? AND name = ?")
        return await self._write(_execute, sql, (kind, name)) > 0

    async def purge(self, queue: str | None = None) -> int:
        count: int = await self._write(self._purge_here, queue)
        await self._give_space_back(always_convert=True)
        return count

    async def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        await self._write(self._register_here, info.worker_id, time.time() + ttl,
                          encode_worker(info))

    async def unregister_worker(self, worker_id: str) -> None:
        sql = self._sql("DELETE FROM {q}.omniq_workers WHERE worker_id = ?")
        await self._write(_execute, sql, (worker_id,))

    async def workers(self) -> list[WorkerInfo]:
        sql = self._sql(
            "SELECT data FROM {q}.omniq_workers WHERE expires_at > ? ORDER BY worker_id"
        )
        rows = await self._call(_fetchall, sql, (time.time(),))
        return [decode_worker(row[0]) for row in rows]


# --- results ------------------------------------------------------------------

# The first final outcome wins: a conditional create, atomic across processes (the
# insert takes the write lock). Only an expired result makes way for a new one.
_STORE_RESULT = (
    "INSERT INTO {r}.omniq_results (task_id, expires_at, finished_at, data) "
    "VALUES (?, ?, ?, ?) ON CONFLICT (task_id) DO UPDATE SET expires_at = excluded.expires_at, "
    "finished_at = excluded.finished_at, data = excluded.data "
    "WHERE expires_at IS NOT NULL AND expires_at <= ?"
)
_GET_RESULT = (
    "SELECT data FROM {r}.omniq_results WHERE task_id = ? "
    "AND (expires_at IS NULL OR expires_at > ?)"
)
_GET_RESULTS = (
    "SELECT task_id, data FROM {r}.omniq_results WHERE task_id IN ({{marks}}) "
    "AND (expires_at IS NULL OR expires_at > ?)"
)
_CLEANUP_RESULTS = (
    "DELETE FROM {r}.omniq_results WHERE task_id IN (SELECT task_id FROM {r}.omniq_results "
    "WHERE (expires_at IS NOT NULL AND expires_at <= ?) OR finished_at < ? "
    f"LIMIT {_CLEANUP_CHUNK})"
)

# A result wait polls (a read, no lock) from 1 ms, in whole milliseconds, like a claim.
_RESULT_WAIT_FIRST = 0.001
_RESULT_WAIT_GROWTH = 1.2
_RESULT_WAIT_MOST = 0.1

_ResultRow = tuple[str, float | None, float, bytes, float]


def _result_row(result: TaskResult) -> _ResultRow:
    expires = result.expires_at.timestamp() if result.expires_at else None
    finished = result.finished_at.timestamp()
    return (result.task_id, expires, finished, encode_result(result), time.time())


class SQLiteResultStorage(_SQLiteStore):
    """Results keyed by task id; waiting polls, woken at once by stores in this process."""

    role = "results"

    async def store(self, result: TaskResult) -> bool:
        if not await self._write(self._store_here, _result_row(result)):
            return False  # an unexpired outcome is already stored: it stays
        self._signal.notify(result.task_id)
        return True

    def _store_here(self, conn: sqlite3.Connection, row: _ResultRow) -> bool:
        return conn.execute(self._sql(_STORE_RESULT), row).rowcount > 0

    def _holds(self, conn: sqlite3.Connection, row: _ResultRow) -> bool:
        """The stored outcome is this very one (encoding is deterministic)."""
        found = conn.execute(self._sql(_GET_RESULT), (row[0], row[4])).fetchone()
        return found is not None and bytes(found[0]) == row[3]

    def _stored_ok(self, conn: sqlite3.Connection, task_id: str) -> bool | None:
        """Whether the stored outcome of `task_id` succeeded; None when there is none."""
        found = conn.execute(self._sql(_GET_RESULT), (task_id, time.time())).fetchone()
        return None if found is None else decode_result(found[0]).ok

    async def get(self, task_id: str) -> TaskResult | None:
        row = await self._call(_fetchone, self._sql(_GET_RESULT), (task_id, time.time()))
        return None if row is None else decode_result(row[0])

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskResult]:
        if not task_ids:
            return {}
        rows = await self._call(self._get_many_here, list(task_ids), time.time())
        return {task_id: decode_result(data) for task_id, data in rows}

    def _get_many_here(
        self, conn: sqlite3.Connection, task_ids: Sequence[str], now: float
    ) -> list[tuple[str, bytes]]:
        rows = []
        for chunk in _chunks(task_ids):
            sql = self._sql(_GET_RESULTS).format(marks=_marks(len(chunk)))
            rows += conn.execute(sql, (*chunk, now)).fetchall()
        return rows

    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        return await poll_for_result(
            self.get, self._signal, task_id, timeout,
            first=_RESULT_WAIT_FIRST, most=_RESULT_WAIT_MOST, factor=_RESULT_WAIT_GROWTH,
        )

    async def delete(self, task_id: str) -> bool:
        sql = self._sql("DELETE FROM {r}.omniq_results WHERE task_id = ?")
        return await self._write(_execute, sql, (task_id,)) > 0

    async def cleanup(self, now: datetime, finished_before: datetime | None = None) -> int:
        # `finished_at < NULL` is never true: no finished_before, no age limit.
        before = None if finished_before is None else finished_before.timestamp()
        return await self._delete_in_chunks(_CLEANUP_RESULTS, (now.timestamp(), before))


# --- events -------------------------------------------------------------------

# A second copy of an event id (a write sent again after a lost reply) is dropped.
_INSERT_EVENT = (
    "INSERT OR IGNORE INTO {e}.omniq_events (event_id, task_id, ts, data) VALUES (?, ?, ?, ?)"
)
_CLEANUP_EVENTS = (
    "DELETE FROM {e}.omniq_events WHERE id IN "
    f"(SELECT id FROM {{e}}.omniq_events WHERE ts < ? LIMIT {_CLEANUP_CHUNK})"
)
_EVENTS_WAIT_FIRST = 0.005
_EVENTS_WAIT_MOST = 0.2
_ROWID_MAX = 2**63 - 1

_EventRow = tuple[str, str, float, bytes]


def _event_row(event: TaskEvent) -> _EventRow:
    return (event.id, event.task_id, event.timestamp.timestamp(), encode_event(event))


_CURSORS = NumberedCursors(_CURSOR_WIDTH, "SQLite")
_cursor = _CURSORS.format
_parse_cursor = _CURSORS.parse


def _append_many(conn: sqlite3.Connection, sql: str, rows: list[_EventRow]) -> int:
    with _immediate(conn):
        return int(conn.executemany(sql, rows).rowcount)


def _last_id(conn: sqlite3.Connection, sql: str) -> int | None:
    row = conn.execute(sql).fetchone()
    return None if row[0] is None else int(row[0])


class SQLiteEventStorage(_SQLiteStore):
    """An append-only event log; the integer rowid is the cursor."""

    role = "events"

    async def append(self, event: TaskEvent) -> None:
        if await self._write(_execute, self._sql(_INSERT_EVENT), _event_row(event)):
            self._signal.notify("new")

    async def append_many(self, events: Sequence[TaskEvent]) -> None:
        if not events:
            return
        rows = [_event_row(e) for e in events]
        if await self._write(_append_many, self._sql(_INSERT_EVENT), rows):
            self._signal.notify("new")

    async def get(self, task_id: str) -> list[TaskEvent]:
        sql = self._sql("SELECT data FROM {e}.omniq_events WHERE task_id = ? ORDER BY id")
        rows = await self._call(_fetchall, sql, (task_id,))
        return [decode_event(row[0]) for row in rows]

    async def read(self, after: str | None, limit: int) -> list[tuple[str, TaskEvent]]:
        sql = self._sql("SELECT id, data FROM {e}.omniq_events WHERE id > ? ORDER BY id LIMIT ?")
        rows = await self._call(_fetchall, sql, (_parse_cursor(after), limit))
        return [(_cursor(rowid), decode_event(data)) for rowid, data in rows]

    async def latest(self, limit: int, before: str | None = None) -> list[tuple[str, TaskEvent]]:
        if limit <= 0:
            return []
        # rowids are positive int64s: below the largest one is every event.
        below = _ROWID_MAX if before is None else _parse_cursor(before)
        sql = self._sql(
            "SELECT id, data FROM {e}.omniq_events WHERE id < ? ORDER BY id DESC LIMIT ?"
        )
        rows = await self._call(_fetchall, sql, (below, limit))
        return [(_cursor(rowid), decode_event(data)) for rowid, data in reversed(rows)]

    async def last_cursor(self) -> str | None:
        last = await self._call(_last_id, self._sql("SELECT max(id) FROM {e}.omniq_events"))
        return None if last is None else _cursor(last)

    async def wait_new(self, after: str | None, timeout: float) -> None:
        floor = _parse_cursor(after)
        deadline = time.monotonic() + timeout
        backoff = PollingBackoff(_EVENTS_WAIT_FIRST, _EVENTS_WAIT_MOST)
        sql = self._sql("SELECT max(id) FROM {e}.omniq_events")
        while True:
            last = await self._call(_last_id, sql)
            remaining = deadline - time.monotonic()
            if (last is not None and last > floor) or remaining <= 0:
                return
            await self._signal.wait("new", min(backoff.next(), remaining))

    async def cleanup(self, before: datetime) -> int:
        return await self._delete_in_chunks(_CLEANUP_EVENTS, (before.timestamp(),))


# --- factory --------------------------------------------------------------------


def create(role: Role, settings: Mapping[str, Any]) -> TaskQueue | ResultStorage | EventStorage:
    """An unopened store of `role`: `path` is its database file (else `base_dir`/<role>.db),
    on the process's Backend for that directory (so the three roles in one directory share
    a thread, a connection and the fused operations)."""
    parsed = parse_settings(SQLiteSettings, "sqlite", settings)
    options = parse_settings(SQLiteOptions, "sqlite", dict(parsed.options or {}))
    path = parsed.path
    if path is None and parsed.base_dir is not None:
        path = os.path.join(parsed.base_dir, _FILE_NAMES[role])
    if path is None:
        raise ConfigError(f"the sqlite {role} store needs a database path (setting 'path')")
    path = os.path.expanduser(str(path))
    try:
        timeout = float(options.busy_timeout)
    except (TypeError, ValueError):
        raise ConfigError(
            f"the sqlite option busy_timeout must be a number of seconds, "
            f"not {options.busy_timeout!r}"
        ) from None
    if role == "queue":
        return SQLiteQueue(path, busy_timeout=timeout)
    if role == "results":
        return SQLiteResultStorage(path, busy_timeout=timeout)
    return SQLiteEventStorage(path, busy_timeout=timeout)
