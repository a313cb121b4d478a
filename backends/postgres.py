"""PostgreSQL for all three roles: one Backend per database and schema, SKIP LOCKED batch
claims, leases, LISTEN/NOTIFY wake-ups and one-statement fused writes.

Layout (one schema, default "omniq", created and migrated on first use): `tasks`
(payload bytes plus queue, priority, seq, state, due, attempts, lease token,
unique_key, unique_ttl, and what a claim needs to decide on a STARTED event without
decoding the payload: expires_at, max_attempts and a digest of the payload),
`unique_keys` (who holds a key, and until when once its task finished), `workers`,
`records` (kind, name, data: schedules and cancel requests beside the queue),
`results` (task_id key, ok, expires_at) and `events` (bigint identity id = cursor,
plus the writer's event_id, unique). A task's `due` is its ETA or retry time while
waiting, its lease end while running and its failure time once failed; dead letters
are listed through partial indexes on that (failed(): ~1 ms for a page of 100 among
100k tasks of which 1k failed, measured; a scan of the table took 30 ms).

A process holds one `PostgresBackend` per connection settings and schema: one small
pool, and once something waits, one LISTEN connection whose notifications wake
waiters in this process (waits still re-check at a bounded interval in case a
notification is lost; a claim on queues it found drained, every 30 s). Its stores
share both, and its fused operations (submit, claim, finish: omniq.storage.FusedOps)
are one statement each. Appends hold the schema's event lock in shared mode until
they commit, and cursor readers wait for them, so a cursor never skips an event.

A write may reach the server while its reply is lost (or comes after
`command_timeout`, default 10 s): the caller sees BackendUnavailable and may send it
again, so every write is safe to repeat. Results are created once (the same bytes
again answer True), events are stored once per id, enqueue is by task id, settling
a delivery is fenced by its claim token, and a claim whose reply was lost is found
again by its tokens (one per delivery) on the Backend's next claim. psycopg never
re-sends by itself.

Schema names are always quoted, so any name PostgreSQL accepts works (even
`My "odd" schema`); empty, over-long (> 63 bytes), NUL-containing and `pg_*`
names are refused with a ConfigError when the store is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import select
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from omniq.backend import Bound, forget_shared, parse_settings, shared
from omniq.backend import boundary as _boundary
from omniq.errors import BackendError, BackendUnavailable, ConfigError, OmniQError, redact
from omniq.models import (
    Delivery,
    FailedTask,
    QueueStats,
    Task,
    TaskEvent,
    TaskResult,
    WorkerInfo,
    check_record_name,
    utcnow,
)
from omniq.registry import Role
from omniq.serialization import (
    FORMAT_VERSION,
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
    NumberedCursors,
    ResultStorage,
    TaskQueue,
    runs_now,
    started_event,
)

T = TypeVar("T")
S = TypeVar("S")
P = ParamSpec("P")
Conn = AsyncConnection[Any]
Params = Sequence[Any] | Mapping[str, Any]
Check = Callable[[], Awaitable[tuple[T | None, float | None]]]

log = logging.getLogger(__name__)

DEFAULT_SCHEMA = "omniq"
DEFAULT_CONNECT_TIMEOUT = 5
DEFAULT_POLL_INTERVAL = 1.0  # longest wait between checks if a notification is lost
# Longest wait for a statement's reply. A reply that never comes (a network path
# gone quiet, a failover) would otherwise hold the call until TCP keepalives give up.
DEFAULT_COMMAND_TIMEOUT = 10.0
_CURSOR_WIDTH = 20  # zero-padded bigint ids: cursors also sort as strings
_MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1, in bytes
_LISTEN_RETRY_MAX = 2.0
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
               "keepalives_count": 3}
# A NOTIFY payload must stay under 8000 bytes: a result notification carries the
# result itself below this size, so a waiter needs no second read.
_NOTE_MAX = 7900
# What a task row's digest seals: the payload as this record format wrote it. A claim
# decides on STARTED in SQL only for rows whose digest still matches (not rewritten by
# someone else, not written in another format); the others are decided after decoding.
_SEAL = f"omniq-task-v{FORMAT_VERSION}:".encode()
# Longest a waiting claim sleeps on "nothing can have changed" (its queues drained, no
# notification since) before it looks again all the same.
_QUIET_MAX = 30.0


# --- naming and errors -------------------------------------------------------


def check_schema(name: str) -> str:
    """Schema names are always quoted, so any text is allowed except what PG refuses."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("PostgreSQL schema name must be a non-empty string")
    if len(name.encode()) > _MAX_IDENTIFIER:
        raise ConfigError(
            f"PostgreSQL schema name {name!r} is longer than {_MAX_IDENTIFIER} bytes"
        )
    if "\x00" in name:
        raise ConfigError("PostgreSQL schema name must not contain NUL characters")
    if name.lower().startswith("pg_"):
        raise ConfigError(f"PostgreSQL schema name {name!r}: the prefix 'pg_' is reserved")
    return name


def _key(text: str) -> int:
    """A stable signed 64-bit number for advisory locks."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big", signed=True)


def _describe(conninfo: str) -> str:
    """host:port/db for messages (never the user's password)."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error:
        return "(unparsable DSN)"
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = str(params.get("port") or "5432")
    db = str(params.get("dbname") or params.get("user") or os.environ.get("PGDATABASE", ""))
    return f"{host}:{port}/{db}"


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return redact(lines[0]) if lines else type(exc).__name__


def translate(exc: BaseException, where: str) -> OmniQError | None:
    """Driver errors become omniq errors here, and nowhere else."""
    if isinstance(exc, psycopg.OperationalError):
        return BackendUnavailable(f"PostgreSQL at {where} is unavailable: {_first_line(exc)}")
    if isinstance(exc, psycopg.Error):
        code = f" [{exc.sqlstate}]" if exc.sqlstate else ""
        return BackendError(f"PostgreSQL error at {where}{code}: {_first_line(exc)}")
    return None


def boundary(
    method: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """omniq.backend.boundary, typed so that decorated methods still satisfy the
    Protocols' `async def`s (the core's returns Awaitable, which mypy does not take
    for a coroutine)."""
    return cast(Callable[Concatenate[S, P], Coroutine[Any, Any, T]], _boundary(method))


# A claim whose reply may have been lost: the server may have taken the lease.
_LOST_REPLY = (BackendUnavailable, psycopg.OperationalError, asyncio.CancelledError)


async def _connect(conninfo: str) -> Conn:
    try:
        return await AsyncConnection.connect(conninfo, autocommit=True)
    except psycopg.ProgrammingError as exc:
        if exc.sqlstate is None:  # libpq refused the DSN itself
            raise ConfigError(f"invalid PostgreSQL DSN: {_first_line(exc)}") from None
        raise


def _discard(conn: Conn) -> None:
    """Close without awaiting (the owning loop may be gone)."""
    with contextlib.suppress(Exception):
        conn.pgconn.finish()


def _hang_up(conn: Conn) -> None:
    """Shut the connection's socket down under psycopg, so its pending read ends at
    once with an OperationalError. (Cancelling the coroutine instead would make
    psycopg ask the server to cancel and wait for that answer too.) The socket is
    not closed here: the event loop still watches its descriptor."""
    with (contextlib.suppress(OSError, ValueError, psycopg.Error),
          socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock):
        sock.shutdown(socket.SHUT_RDWR)


class _ReplyTimer:
    """Hangs up `conn` if its reply has not come within `seconds`."""

    def __init__(self, conn: Conn, seconds: float) -> None:
        self.fired = False
        self._handle = asyncio.get_running_loop().call_later(seconds, self._fire, conn)

    def _fire(self, conn: Conn) -> None:
        self.fired = True
        _hang_up(conn)

    def cancel(self) -> None:
        self._handle.cancel()


def _looks_dead(conn: Conn) -> bool:
    """An idle connection has nothing to read; readable means the server hung up."""
    if conn.closed or conn.broken:
        return True
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


# --- connections -------------------------------------------------------------


class _Pool:
    """A few autocommit connections made on demand; broken ones are dropped.

    Unlike psycopg_pool it never retries in the background: a refused connection
    surfaces at once as the real error, and a restarted server is used again on
    the very next call (idle connections the server closed are noticed without
    a round trip).
    """

    def __init__(self, conninfo: str, max_size: int) -> None:
        self._conninfo = conninfo
        self.idle: list[Conn] = []
        self.slots = asyncio.Semaphore(max_size)  # held while a connection is lent
        self._closed = False

    async def take(self) -> Conn:
        while self.idle:
            conn = self.idle.pop()
            if not _looks_dead(conn):
                return conn
            _discard(conn)
        return await _connect(self._conninfo)

    def give_back(self, conn: Conn) -> None:
        if (self._closed or conn.closed or conn.broken
                or conn.info.transaction_status != TransactionStatus.IDLE):
            _discard(conn)
        else:
            self.idle.append(conn)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        async with self.slots:
            conn = await self.take()
            try:
                yield conn
            finally:
                self.give_back(conn)

    async def warm(self, count: int) -> None:
        while len(self.idle) < count:
            self.idle.append(await _connect(self._conninfo))

    async def close(self) -> None:
        self._closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    def abandon(self, forked: bool) -> None:
        """Forget every connection. A forked child must not close them (that would
        end the parent's sessions); psycopg skips PQfinish outside the creating process."""
        self._closed = True
        idle, self.idle = self.idle, []
        if not forked:
            for conn in idle:
                _discard(conn)


class _Listener:
    """The Backend's one LISTEN connection; wakes in-process waiters by channel and key.

    It listens on the channels something waited on so far (a worker's listener hears
    no results). It reconnects by itself, and whenever it (re)connects it wakes every
    waiter, because notifications sent while it was away are lost. On the channels in
    `framed`, a payload is "<length of key>:<key><body>"; the body (maybe empty) is
    what the waiter's future gets.
    """

    def __init__(self, conninfo: str, framed: frozenset[str]) -> None:
        self._conninfo = conninfo
        self._framed = framed
        self._wanted: set[str] = set()
        self._heard: set[str] = set()  # LISTENed on the current connection
        self._waiters: dict[tuple[str, str], set[asyncio.Future[str | None]]] = {}
        self._ever_heard = False  # the current attempt got as far as LISTEN
        self._tried = asyncio.Event()
        self._kick = asyncio.Event()  # a channel was added, or a waiter is in a hurry
        self._task: asyncio.Task[None] | None = None
        self._conn: Conn | None = None
        self.connections = 0  # made so far
        self.notes = 0  # notifications heard so far

    def mark(self, channel: str) -> tuple[int, int] | None:
        """What changes whenever a notification on `channel` may have come (None when
        one could be missed: not listening on it)."""
        return (self.connections, self.notes) if channel in self._heard else None

    async def ensure(self, channel: str, patience: float) -> bool:
        """Listen on `channel` (or hurry a reconnect); True once its notifications
        will arrive."""
        if channel in self._heard:
            return True
        self._wanted.add(channel)
        self._tried.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="omniq-pg-listen")
        else:
            self._kick.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tried.wait(), patience)
        return channel in self._heard

    def watch(self, channel: str, keys: Sequence[str]) -> asyncio.Future[str | None]:
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        for key in keys:
            self._waiters.setdefault((channel, key), set()).add(fut)
        return fut

    def unwatch(self, channel: str, keys: Sequence[str], fut: asyncio.Future[str | None]) -> None:
        for key in keys:
            waiting = self._waiters.get((channel, key))
            if waiting is not None:
                waiting.discard(fut)
                if not waiting:
                    del self._waiters[(channel, key)]

    def _deliver(self, channel: str, payload: str) -> None:
        self.notes += 1
        key, body = payload, None
        if channel in self._framed:
            size, _, rest = payload.partition(":")
            if size.isdigit():
                key, body = rest[: int(size)], rest[int(size):]
        for fut in self._waiters.pop((channel, key), ()):
            if not fut.done():
                fut.set_result(body or None)

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for futs in waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)

    async def _run(self) -> None:
        delay = 0.05
        while True:
            self._kick.clear()
            self._ever_heard = False
            try:
                await self._listen()
            except (psycopg.Error, OSError, ConfigError) as exc:
                log.debug("LISTEN interrupted: %s", _first_line(exc))
            delay = 0.05 if self._ever_heard else min(delay * 2, _LISTEN_RETRY_MAX)
            self._tried.set()
            self._wake_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), delay)

    async def _listen(self) -> None:
        conn = self._conn = await _connect(self._conninfo)
        self.connections += 1
        try:
            while True:
                self._kick.clear()
                for channel in sorted(self._wanted - self._heard):
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self._heard.add(channel)
                if not self._ever_heard:
                    self._ever_heard = True
                    self._wake_all()
                self._tried.set()
                await self._read_until_kicked(conn)
        finally:
            self._heard.clear()
            self._conn = None
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def _read_until_kicked(self, conn: Conn) -> None:
        """Deliver notifications until a kick (a channel to add); a lost connection
        raises. Stopping the read is safe: an idle connection has nothing in flight,
        and psycopg keeps what arrives meanwhile for the next read."""
        reader = asyncio.ensure_future(self._receive(conn))
        kicked = asyncio.ensure_future(self._kick.wait())
        try:
            await asyncio.wait({reader, kicked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            kicked.cancel()
            await asyncio.wait({reader, kicked})
        lost = None if reader.cancelled() else reader.exception()
        if lost is not None:
            raise lost

    async def _receive(self, conn: Conn) -> None:
        async for note in conn.notifies():
            self._deliver(note.channel, note.payload)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._wake_all()

    def abandon(self, forked: bool) -> None:
        task, self._task = self._task, None
        conn, self._conn = self._conn, None
        if conn is not None and not forked:
            _discard(conn)
        if task is not None and not forked:
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                task.get_loop().call_soon_threadsafe(task.cancel)


class _State:
    """The pool and listener of one Backend in one process and event loop."""

    def __init__(self, conninfo: str, max_size: int, framed: frozenset[str]) -> None:
        self.pool = _Pool(conninfo, max_size)
        self.listener = _Listener(conninfo, framed)
        self.migrated = False
        self.migrating = asyncio.Lock()

    async def close(self) -> None:
        await self.listener.close()
        await self.pool.close()

    def abandon(self, forked: bool) -> None:
        self.listener.abandon(forked)
        self.pool.abandon(forked)


# --- schema ------------------------------------------------------------------

# A statement of a migration: SQL with {s} for the schema, or for a function whose
# body is SQL text itself, (header with {body}, body with {s}): the body goes in as a
# quoted literal, so no schema name can end it early.
Statement = str | tuple[str, str]


def _events_function(name: str, args: str, returns: str, query: str) -> tuple[str, str]:
    """A reader of the event log that first waits for every append in flight.

    Appends hold the schema's event lock in shared mode until they commit; this takes
    it exclusively, so it returns once those committed, and then reads with a fresh
    snapshot (each statement of a VOLATILE SQL function takes its own). A cursor
    reader therefore never moves past an id whose row becomes visible later.
    """
    params = f"{args}, lock_key bigint" if args else "lock_key bigint"
    header = (f"CREATE OR REPLACE FUNCTION {{s}}.{name}({params})"
              f" RETURNS {returns} LANGUAGE sql VOLATILE AS {{body}}")
    return header, f"SELECT pg_advisory_xact_lock(lock_key); {query}"


_MIGRATIONS: tuple[tuple[Statement, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS {s}.tasks (
            id text PRIMARY KEY,
            queue text NOT NULL,
            priority integer NOT NULL DEFAULT 0,
            seq bigint GENERATED ALWAYS AS IDENTITY,
            state text NOT NULL DEFAULT 'waiting'
                CHECK (state IN ('waiting', 'running', 'failed')),
            due timestamptz NOT NULL DEFAULT now(),
            attempts integer NOT NULL DEFAULT 0,
            token bigint,
            unique_key text,
            payload bytea NOT NULL)""",
        # `due` is the ETA/retry time while waiting and the lease end while
        # running, so one predicate finds both new work and expired leases.
        "CREATE INDEX IF NOT EXISTS tasks_claim ON {s}.tasks (queue, priority DESC, seq)"
        " WHERE state <> 'failed'",
        "CREATE INDEX IF NOT EXISTS tasks_due ON {s}.tasks (queue, due) WHERE state <> 'failed'",
        "CREATE UNIQUE INDEX IF NOT EXISTS tasks_unique ON {s}.tasks (unique_key)"
        " WHERE unique_key IS NOT NULL AND state <> 'failed'",
        """CREATE TABLE IF NOT EXISTS {s}.workers (
            worker_id text PRIMARY KEY,
            expires_at timestamptz NOT NULL,
            payload bytea NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS {s}.results (
            task_id text PRIMARY KEY,
            expires_at timestamptz,
            finished_at timestamptz NOT NULL,
            payload bytea NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS results_expiry ON {s}.results (expires_at)"
        " WHERE expires_at IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS results_finished ON {s}.results (finished_at)",
        """CREATE TABLE IF NOT EXISTS {s}.events (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            task_id text NOT NULL,
            ts timestamptz NOT NULL,
            payload bytea NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS events_task ON {s}.events (task_id, id)",
        "CREATE INDEX IF NOT EXISTS events_ts ON {s}.events (ts)",
    ),
    (
        # Events carry their writer's id, stored once (a write re-sent after a lost
        # reply is dropped). Rows from before keep NULL: serialization gives them a
        # stable legacy id, and a unique index admits any number of NULLs.
        "ALTER TABLE {s}.events ADD COLUMN IF NOT EXISTS event_id text",
        "CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON {s}.events (event_id)",
        # A claim whose reply was lost is found again by its token.
        "CREATE INDEX IF NOT EXISTS tasks_token ON {s}.tasks (token) WHERE token IS NOT NULL",
        # Unique keys outlive their task by unique_ttl, so they move to a table of
        # their own: held_until NULL = held while the task is unfinished.
        "ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS unique_ttl double precision",
        """CREATE TABLE IF NOT EXISTS {s}.unique_keys (
            unique_key text PRIMARY KEY,
            task_id text NOT NULL,
            held_until timestamptz)""",
        "CREATE INDEX IF NOT EXISTS unique_keys_expiry ON {s}.unique_keys (held_until)"
        " WHERE held_until IS NOT NULL",
        "INSERT INTO {s}.unique_keys (unique_key, task_id) SELECT unique_key, id FROM {s}.tasks"
        " WHERE unique_key IS NOT NULL AND state <> 'failed' ON CONFLICT DO NOTHING",
        "DROP INDEX IF EXISTS {s}.tasks_unique",
    ),
    (
        # What a fused claim decides in SQL: whether the worker will run the task
        # (storage.runs_now) and whether its result is stored already (and ok).
        # Rows from before keep NULL and are decided after decoding.
        "ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS expires_at timestamptz",
        "ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS max_attempts integer",
        "ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS digest bytea",
        "ALTER TABLE {s}.results ADD COLUMN IF NOT EXISTS ok boolean",
        # Cursor readers of the event log (appends now lock in shared mode).
        _events_function("events_after", "after bigint, n integer",
                         "TABLE (event_no bigint, event_payload bytea)",
                         "SELECT e.id, e.payload FROM {s}.events e WHERE e.id > after"
                         " ORDER BY e.id LIMIT n"),
        _events_function("events_before", "below bigint, n integer",
                         "TABLE (event_no bigint, event_payload bytea)",
                         "SELECT e.id, e.payload FROM {s}.events e WHERE e.id < below"
                         " ORDER BY e.id DESC LIMIT n"),
        _events_function("events_last", "", "bigint",
                         "SELECT max(e.id) FROM {s}.events e"),
    ),
    (
        # Dead letters by failure time. A failed row's `due` is when it failed: every
        # version of this backend has set it so (a dead row's due is never moved), so
        # rows failed before this migration, and rows an older OmniQ fails beside this
        # one, are indexed right without a new column. Partial: claims, retries and
        # acks of running and waiting rows never touch these indexes.
        "CREATE INDEX IF NOT EXISTS tasks_failed ON {s}.tasks (due) WHERE state = 'failed'",
        "CREATE INDEX IF NOT EXISTS tasks_failed_queue ON {s}.tasks (queue, due)"
        " WHERE state = 'failed'",
        # Named records beside the queue (schedules, their state, cancel requests).
        # Collation "C": the primary key's order is the names' code point order, so
        # a listing sorted by name is read in index order.
        """CREATE TABLE IF NOT EXISTS {s}.records (
            kind text COLLATE "C" NOT NULL,
            name text COLLATE "C" NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (kind, name))""",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)


def _compose(text: str, schema: str) -> str:
    return sql.SQL(text).format(s=sql.Identifier(schema)).as_string()


def _compose_statement(statement: Statement, schema: str) -> str:
    if isinstance(statement, str):
        return _compose(statement, schema)
    header, body = statement
    composed = sql.SQL(header).format(s=sql.Identifier(schema),
                                      body=sql.Literal(_compose(body, schema)))
    return composed.as_string()


# --- statements ----------------------------------------------------------------

# Event appends lock the schema's event log in shared mode until they commit, and
# cursor readers take it exclusively (see _events_function): appends no longer wait
# for each other, so concurrent commits can share one WAL flush.
_APPEND_LOCK = "pg_advisory_xact_lock_shared(%(lock)s)"
_TASK_COLUMNS = ("id, queue, priority, due, expires_at, max_attempts, digest, unique_key,"
                 " unique_ttl, payload")
_TASK_VALUES = ("%(id)s, %(queue)s, %(priority)s, coalesce(%(eta)s::timestamptz, now()),"
                " %(expires)s, %(max_attempts)s, %(digest)s, %(key)s, %(ttl)s, %(payload)s")
# A dead letter enqueued again starts from scratch; an unfinished task of that id is
# left alone (the statement then returns no row).
_REQUEUE_DEAD = (
    " ON CONFLICT (id) DO UPDATE SET queue = EXCLUDED.queue, priority = EXCLUDED.priority,"
    " due = EXCLUDED.due, expires_at = EXCLUDED.expires_at,"
    " max_attempts = EXCLUDED.max_attempts, digest = EXCLUDED.digest,"
    " unique_key = EXCLUDED.unique_key, unique_ttl = EXCLUDED.unique_ttl,"
    " payload = EXCLUDED.payload, state = 'waiting', attempts = 0, token = NULL, seq = DEFAULT"
    " WHERE t.state = 'failed'"
)
# Whether the existing unique_keys row `k` may go to the task in EXCLUDED: it is that
# task's own, or its hold time has passed. Only `k` itself is consulted: ON CONFLICT
# sees its latest version, while a subquery would see the statement's snapshot, in
# which the holder's task row, committed a moment ago with `k`, may not exist yet.
_KEY_FREE = "(k.task_id = EXCLUDED.task_id OR k.held_until <= now())"
# The key is taken (or found held) in the same statement that stores the task, so two
# producers of one key cannot both get in. The row is always returned (its holder),
# at the price of rewriting it when the key was held.
_HELD = (
    "held AS (INSERT INTO {s}.unique_keys AS k (unique_key, task_id)"
    " VALUES (%(key)s, %(id)s) ON CONFLICT (unique_key) DO UPDATE SET"
    " task_id = CASE WHEN " + _KEY_FREE + " THEN EXCLUDED.task_id ELSE k.task_id END,"
    " held_until = CASE WHEN " + _KEY_FREE + " THEN NULL ELSE k.held_until END"
    " RETURNING k.task_id, k.held_until IS NULL AS unfinished)"
)
# After a CTE `done` (id, unique_key, unique_ttl) of finished tasks: keep each key
# for its unique_ttl, or free it at once.
_SETTLE_KEYS = (
    ", kept AS (UPDATE {s}.unique_keys k"
    " SET held_until = now() + d.unique_ttl * interval '1 second' FROM done d"
    " WHERE k.unique_key = d.unique_key AND k.task_id = d.id AND d.unique_ttl > 0)"
    ", freed AS (DELETE FROM {s}.unique_keys k USING done d"
    " WHERE k.unique_key = d.unique_key AND k.task_id = d.id"
    " AND NOT coalesce(d.unique_ttl > 0, false))"
)
# After a CTE `done` (id, unique_key) of removed tasks: cancel and purge free keys at once.
_FREE_KEYS = (
    ", freed AS (DELETE FROM {s}.unique_keys k USING done d"
    " WHERE k.unique_key = d.unique_key AND k.task_id = d.id)"
    " SELECT count(*) FROM done"
)
_ACKED = ("done AS (DELETE FROM {s}.tasks WHERE id = %(id)s AND token = %(token)s"
          " AND state = 'running' RETURNING id, unique_key, unique_ttl)")
_DEAD = ("done AS (UPDATE {s}.tasks SET state = 'failed', token = NULL, due = now()"
         " WHERE id = %(id)s AND token = %(token)s AND state = 'running'"
         " RETURNING id, unique_key, unique_ttl)")
# results: the first final outcome wins. An expired result gives way; the same bytes
# again are this very write re-sent after a lost reply, so it counts as stored.
_STORE = (
    "stored AS (INSERT INTO {s}.results AS r (task_id, expires_at, finished_at, ok, payload)"
    " VALUES (%(r_task)s, %(r_expires)s, %(r_finished)s, %(r_ok)s, %(r_payload)s)"
    " ON CONFLICT (task_id) DO UPDATE SET expires_at = EXCLUDED.expires_at,"
    " finished_at = EXCLUDED.finished_at, ok = EXCLUDED.ok, payload = EXCLUDED.payload"
    " WHERE r.expires_at <= now() OR r.payload = EXCLUDED.payload"
    " RETURNING pg_notify(%(rchan)s, %(r_note)s))"
)


def _put(if_held: bool) -> str:
    """The CTE `put` storing the task (only if `held` gave its key to it)."""
    values = (f"SELECT {_TASK_VALUES} FROM held WHERE held.task_id = %(id)s" if if_held
              else f"VALUES ({_TASK_VALUES})")
    return (f"put AS (INSERT INTO {{s}}.tasks AS t ({_TASK_COLUMNS}) {values}{_REQUEUE_DEAD}"
            " RETURNING pg_notify(%(qchan)s, t.queue))")


def _one_event(source: str | None) -> str:
    """CTEs storing the event in %(e_*)s (once), if the CTE `source` returned a row."""
    origin = f" FROM {source}" if source else ""
    return (
        f"turn AS (SELECT {_APPEND_LOCK}{origin})"
        ", ev AS (INSERT INTO {s}.events (event_id, task_id, ts, payload)"
        " SELECT %(e_id)s, %(e_task)s, %(e_ts)s, %(e_payload)s FROM turn"
        " ON CONFLICT (event_id) DO NOTHING RETURNING pg_notify(%(echan)s, ''))"
    )


def _claim_sql(fused: bool) -> str:
    """Claim up to %(limit)s tasks, queues in the given order, each with its own token.

    Fused (a worker's claim), the same statement settles the tasks whose result is
    stored (their worker died between the result and the ack) and stores the STARTED
    event of each task the worker will run. When fewer than %(limit)s were there, a last
    row of NULLs carries the seconds until another task of these queues falls due
    (NULL: none), which is how long a waiting claim may sleep unless notified."""
    return (
        "WITH " + _picked(fused) + ", " + _claimed(fused)
        + (_settle_stored() + _started() if fused else "")
        + " SELECT id, queue, payload, attempts, token, starts, n, NULL::float8 FROM claimed"
        " UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, extract(epoch FROM"
        " (SELECT min(d.due) FROM unnest(%(queues)s::text[]) AS q(name) CROSS JOIN LATERAL"
        " (SELECT due FROM {s}.tasks t WHERE queue = q.name AND state <> 'failed'"
        " AND NOT EXISTS (SELECT FROM picked p WHERE p.id = t.id) ORDER BY due LIMIT 1) d)"
        " - now())::float8 WHERE (SELECT count(*) FROM picked) < %(limit)s ORDER BY 7"
    )


def _picked(fused: bool) -> str:
    # One index scan per queue (queue, priority DESC, seq); a task whose result is
    # stored comes with that result's ok.
    settled = ", r.ok AS settled" if fused else ", NULL::boolean AS settled"
    results = (" LEFT JOIN {s}.results r ON r.task_id = p.id"
               " AND (r.expires_at IS NULL OR r.expires_at > now())") if fused else ""
    return (
        "picked AS MATERIALIZED (SELECT p.id" + settled + ","
        " row_number() OVER (ORDER BY q.n, p.priority DESC, p.seq) AS n"
        " FROM unnest(%(queues)s::text[]) WITH ORDINALITY AS q(name, n)"
        " CROSS JOIN LATERAL (SELECT id, priority, seq FROM {s}.tasks"
        " WHERE queue = q.name AND state <> 'failed' AND due <= now()"
        " ORDER BY priority DESC, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED) p" + results
        + " ORDER BY q.n, p.priority DESC, p.seq LIMIT %(limit)s)"
    )


def _claimed(fused: bool) -> str:
    # `starts`: storage.runs_now in SQL, for rows whose digest says the payload is
    # as this format wrote it (NULL, for older rows, means: decide after decoding).
    starts = (", t.digest = sha256(%(seal)s || t.payload) AND t.attempts <= t.max_attempts"
              " AND (t.expires_at IS NULL OR t.expires_at > %(now)s) AS starts") if fused \
        else ", false AS starts"
    return (
        "claimed AS (UPDATE {s}.tasks t SET state = 'running', attempts = t.attempts + 1,"
        " token = (%(tokens)s::bigint[])[p.n], due = now() + %(lease)s * interval '1 second'"
        " FROM picked p WHERE t.id = p.id AND p.settled IS NULL"
        " RETURNING t.id, t.queue, t.payload, t.attempts, t.token, p.n" + starts + ")"
    )


def _settle_stored() -> str:
    # A result stored before 3 has ok NULL: its task is claimed and runs again; its
    # late outcome then loses to the stored one.
    return (
        ", acked AS (DELETE FROM {s}.tasks t USING picked p WHERE t.id = p.id AND p.settled"
        " RETURNING t.id, t.unique_key, t.unique_ttl)"
        ", dead AS (UPDATE {s}.tasks t SET state = 'failed', token = NULL, due = now()"
        " FROM picked p WHERE t.id = p.id AND NOT p.settled"
        " RETURNING t.id, t.unique_key, t.unique_ttl)"
        ", done AS (TABLE acked UNION ALL TABLE dead)" + _SETTLE_KEYS
    )


def _started() -> str:
    # The event is %(template)s (storage.started_event's, encoded) with this claim's
    # task, queue, attempt and id: the id storage.started_event gives it.
    return (
        ", turn AS (SELECT " + _APPEND_LOCK + " FROM claimed WHERE starts LIMIT 1)"
        ", started AS (INSERT INTO {s}.events (event_id, task_id, ts, payload)"
        " SELECT x.event_id, c.id, %(ts)s, convert_to((%(template)s::jsonb"
        " || jsonb_build_object('id', x.event_id, 'task_id', c.id, 'queue', c.queue,"
        " 'attempt', c.attempts))::text, 'UTF8') FROM claimed c CROSS JOIN turn"
        " CROSS JOIN LATERAL (SELECT 'started:' || c.id || ':' || c.attempts || ':' || c.token"
        " AS event_id) x WHERE c.starts ORDER BY c.n"
        " ON CONFLICT (event_id) DO NOTHING RETURNING pg_notify(%(echan)s, ''))"
    )


def _failed_sql(of_queue: str) -> str:
    """Dead letters failed in [%(since)s, %(before)s), newest first: the newest
    %(limit)s, and every other one that failed in the same microsecond as the last of
    them (a page never ends inside such a group). Two range scans of a failure-time
    index, each reading about one page."""
    where = "state = 'failed'" + of_queue
    return (
        "WITH page AS MATERIALIZED (SELECT due FROM {s}.tasks WHERE " + where
        + " AND due >= %(since)s AND due < %(before)s ORDER BY due DESC LIMIT %(limit)s)"
        " SELECT id, queue, payload, due FROM {s}.tasks WHERE " + where
        + " AND due >= (SELECT min(due) FROM page) AND due < %(before)s"
        " ORDER BY due DESC, id"
    )


_SQL = {
    "version": "SELECT max(version) FROM {s}.schema_version",
    "create_schema": "CREATE SCHEMA IF NOT EXISTS {s}",
    "create_version": "CREATE TABLE IF NOT EXISTS {s}.schema_version"
    " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    "set_version": "INSERT INTO {s}.schema_version (version) VALUES (%s)",
    # queue
    "enqueue": "WITH " + _put(if_held=False) + " SELECT 1",
    "enqueue_unique": "WITH " + _HELD + ", " + _put(if_held=True)
    + " SELECT task_id, unfinished FROM held",
    # A key held for an unfinished task whose row is gone or dead (deleted by hand,
    # or by an older OmniQ that did not know unique_keys) is stale: drop it. Its own
    # statement, so the snapshot includes the holder's commit.
    "drop_stale_key": "DELETE FROM {s}.unique_keys k WHERE unique_key = %s AND task_id = %s"
    " AND held_until IS NULL AND NOT EXISTS (SELECT 1 FROM {s}.tasks o"
    " WHERE o.id = k.task_id AND o.state <> 'failed')",
    "claim": _claim_sql(fused=False),
    # Claims of ours whose reply never came: still ours while their lease runs, and
    # the lease is renewed from now. Their attempts were counted by those claims.
    "refind": "UPDATE {s}.tasks SET due = now() + %s * interval '1 second'"
    " WHERE id IN (SELECT id FROM {s}.tasks WHERE token = ANY(%s) AND state = 'running'"
    " AND due > now() LIMIT %s FOR UPDATE SKIP LOCKED)"
    " RETURNING id, queue, payload, attempts, token",
    "hand_back": "UPDATE {s}.tasks SET state = 'waiting', token = NULL, due = now(),"
    " attempts = greatest(attempts - 1, 0)"
    " WHERE token = ANY(%s) AND state = 'running' RETURNING pg_notify(%s, queue)",
    "ack": "WITH " + _ACKED + _SETTLE_KEYS + " SELECT count(*) FROM done",
    "dead": "WITH " + _DEAD + _SETTLE_KEYS + " SELECT count(*) FROM done",
    "retry": "UPDATE {s}.tasks SET state = 'waiting', token = NULL,"
    " due = now() + %s * interval '1 second'"
    " WHERE id = %s AND token = %s AND state = 'running' RETURNING pg_notify(%s, queue)",
    # Notified even with a delay: a claim asleep on drained queues learns the new due.
    "release": "UPDATE {s}.tasks SET state = 'waiting', token = NULL,"
    " due = now() + %s * interval '1 second', attempts = greatest(attempts - 1, 0)"
    " WHERE id = %s AND token = %s AND state = 'running' RETURNING pg_notify(%s, queue)",
    "extend": "UPDATE {s}.tasks SET due = now() + %s * interval '1 second'"
    " WHERE id = %s AND token = %s AND state = 'running'",
    "cancel": "WITH done AS (DELETE FROM {s}.tasks WHERE id = %s AND state = 'waiting'"
    " RETURNING id, unique_key)" + _FREE_KEYS,
    "get_task": "SELECT payload, queue FROM {s}.tasks WHERE id = %s",
    "stats": "SELECT queue,"
    " count(*) FILTER (WHERE state = 'waiting' AND due <= now()),"
    " count(*) FILTER (WHERE state = 'waiting' AND due > now()),"
    " count(*) FILTER (WHERE state = 'running'),"
    " count(*) FILTER (WHERE state = 'failed'),"
    " min(due) FILTER (WHERE state = 'waiting' AND due <= now())"
    " FROM {s}.tasks GROUP BY queue ORDER BY queue",
    "failed": _failed_sql(""),
    "failed_queue": _failed_sql(" AND queue = %(queue)s"),
    "forget": "WITH done AS (DELETE FROM {s}.tasks WHERE id = ANY(%s) AND state = 'failed'"
    " RETURNING id, unique_key)" + _FREE_KEYS,
    "put_record": "INSERT INTO {s}.records (kind, name, data) VALUES (%s, %s, %s)"
    " ON CONFLICT (kind, name) DO UPDATE SET data = EXCLUDED.data",
    "get_record": "SELECT data FROM {s}.records WHERE kind = %s AND name = %s",
    "list_records": "SELECT name, data FROM {s}.records WHERE kind = %s ORDER BY name",
    "delete_record": "DELETE FROM {s}.records WHERE kind = %s AND name = %s",
    "purge": "WITH done AS (DELETE FROM {s}.tasks WHERE state <> 'running'"
    " RETURNING id, unique_key)" + _FREE_KEYS,
    "purge_queue": "WITH done AS (DELETE FROM {s}.tasks WHERE state <> 'running'"
    " AND queue = %s RETURNING id, unique_key)" + _FREE_KEYS,
    # Workers' heartbeats also sweep what expired: old worker rows, and unique keys
    # whose hold time has passed (enqueue treats those as free anyway).
    "register": "WITH gone AS (DELETE FROM {s}.workers"
    " WHERE expires_at < now() - interval '1 day'),"
    " keys_gone AS (DELETE FROM {s}.unique_keys WHERE held_until < now())"
    " INSERT INTO {s}.workers (worker_id, expires_at, payload)"
    " VALUES (%s, now() + %s * interval '1 second', %s)"
    " ON CONFLICT (worker_id) DO UPDATE"
    " SET expires_at = EXCLUDED.expires_at, payload = EXCLUDED.payload",
    "unregister": "DELETE FROM {s}.workers WHERE worker_id = %s",
    "workers": "SELECT payload FROM {s}.workers WHERE expires_at > now() ORDER BY worker_id",
    # results
    "store": "WITH " + _STORE + " SELECT count(*) FROM stored",
    "get_result": "SELECT payload FROM {s}.results"
    " WHERE task_id = %s AND (expires_at IS NULL OR expires_at > now())",
    "get_results": "SELECT task_id, payload FROM {s}.results"
    " WHERE task_id = ANY(%s) AND (expires_at IS NULL OR expires_at > now())",
    "delete_result": "DELETE FROM {s}.results WHERE task_id = %s",
    "cleanup_results": "DELETE FROM {s}.results WHERE expires_at <= %s",
    "cleanup_finished": "DELETE FROM {s}.results WHERE expires_at <= %s OR finished_at < %s",
    # events: an event id already stored is dropped (notifying nobody).
    "append": "WITH turn AS (SELECT " + _APPEND_LOCK + ")"
    " INSERT INTO {s}.events (event_id, task_id, ts, payload)"
    " SELECT u.event_id, u.task_id, u.ts, u.payload FROM turn,"
    " unnest(%(ids)s::text[], %(tasks)s::text[], %(tss)s::timestamptz[], %(payloads)s::bytea[])"
    " WITH ORDINALITY AS u(event_id, task_id, ts, payload, n) ORDER BY u.n"
    " ON CONFLICT (event_id) DO NOTHING RETURNING pg_notify(%(echan)s, '')",
    "append_one": "WITH " + _one_event(None) + " SELECT 1",
    "events_of": "SELECT payload FROM {s}.events WHERE task_id = %s ORDER BY id",
    "read": "SELECT event_no, event_payload FROM {s}.events_after(%s, %s, %s)",
    "latest": "SELECT event_no, event_payload FROM {s}.events_before(%s, %s, %s)",
    "last": "SELECT {s}.events_last(%s)",
    "any_after": "SELECT EXISTS (SELECT 1 FROM {s}.events WHERE id > %s)",
    "cleanup_events": "DELETE FROM {s}.events WHERE ts < %s",
    # fused: the task and its ENQUEUED event (none when the task was not stored) ...
    "submit": "WITH " + _put(if_held=False) + ", " + _one_event("put") + " SELECT 1",
    "submit_unique": "WITH " + _HELD + ", " + _put(if_held=True) + ", " + _one_event("put")
    + " SELECT task_id, unfinished FROM held",
    # ... a batch claim with its STARTED events ...
    "claim_started": _claim_sql(fused=True),
    # ... and the result, its outcome event only if stored, and the fenced ack.
    "finish_ack": "WITH " + _STORE + ", " + _one_event("stored") + ", " + _ACKED + _SETTLE_KEYS
    + " SELECT count(*) FROM stored",
    "finish_dead": "WITH " + _STORE + ", " + _one_event("stored") + ", " + _DEAD + _SETTLE_KEYS
    + " SELECT count(*) FROM stored",
}
# Bulk maintenance may rightly take long; it is idempotent, so it runs without
# the reply timeout that guards every other statement.
_UNTIMED = frozenset({"purge", "purge_queue", "cleanup_results", "cleanup_finished",
                      "cleanup_events"})


# --- settings ----------------------------------------------------------------

_POOL_OPTIONS = frozenset({"min_size", "max_size", "connect_timeout", "poll_interval",
                           "command_timeout"})
DEFAULT_MAX_SIZE = 4


@dataclass(frozen=True)
class PostgresSettings:
    """The postgres backend's settings: a store's config keys without their prefix.

    `dsn` (or `url`) wins; host/port/db/username/password fill in or override its
    parts; `options` carries pool settings (min_size, max_size, connect_timeout,
    poll_interval, command_timeout) and libpq parameters."""

    dsn: str | None = None
    url: str | None = None
    host: str | None = None
    port: int | None = None
    db: str | int | None = None
    username: str | None = None
    password: str | None = None
    schema: str = DEFAULT_SCHEMA
    tls: bool | Mapping[str, Any] | None = None
    options: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class _Place:
    """Settings resolved: what makes two Backends the same one."""

    conninfo: str
    schema: str
    min_size: int = 1
    max_size: int = DEFAULT_MAX_SIZE
    poll_interval: float = DEFAULT_POLL_INTERVAL
    command_timeout: float | None = DEFAULT_COMMAND_TIMEOUT


def _resolve(settings: PostgresSettings) -> _Place:
    options = dict(settings.options or {})
    pool = {k: options.pop(k) for k in list(options) if k in _POOL_OPTIONS}
    params = {
        "host": settings.host,
        "port": settings.port,
        "dbname": settings.db,
        "user": settings.username,
        "password": settings.password,
        **_tls_params(settings.tls),
        **options,
    }
    params = {k: v for k, v in params.items() if v is not None}
    dsn = settings.dsn or settings.url or ""
    if not dsn and not params:
        raise ConfigError("the postgres backend needs a DSN (setting 'dsn')")
    min_size, max_size = int(pool.get("min_size", 1)), int(pool.get("max_size", DEFAULT_MAX_SIZE))
    if max_size < 1 or min_size < 0 or min_size > max_size:
        raise ConfigError("PostgreSQL pool sizes need 0 <= min_size <= max_size, "
                          f"max_size >= 1 (got {min_size=}, {max_size=})")
    timeout = pool.get("command_timeout", DEFAULT_COMMAND_TIMEOUT)
    if timeout is not None and not timeout > 0:
        raise ConfigError("PostgreSQL command_timeout must be a positive number of "
                          f"seconds or null (got {timeout!r})")
    return _Place(
        conninfo=_build_conninfo(dsn, pool.get("connect_timeout"), params),
        schema=check_schema(settings.schema),
        min_size=min_size,
        max_size=max_size,
        poll_interval=float(pool.get("poll_interval", DEFAULT_POLL_INTERVAL)),
        command_timeout=None if timeout is None else float(timeout),
    )


def _build_conninfo(dsn: str, connect_timeout: float | None, extra: Mapping[str, Any]) -> str:
    """The DSN, overridden by explicit parameters, over our defaults. Nothing connects
    here; a DSN libpq cannot parse is kept as is and reported as ConfigError on use."""
    try:
        given = conninfo_to_dict(dsn) if dsn else {}
    except psycopg.Error:
        return dsn
    # Without keepalives a silently dropped LISTEN connection would never be noticed.
    params: dict[str, Any] = {"application_name": "omniq", **_KEEPALIVES,
                              "connect_timeout": DEFAULT_CONNECT_TIMEOUT, **given}
    params.update((k, v) for k, v in extra.items() if v is not None)
    if connect_timeout is not None:
        params["connect_timeout"] = max(1, round(connect_timeout))
    try:
        return make_conninfo("", **params)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"invalid PostgreSQL connection setting: {_first_line(exc)}") from None


def _connect_timeout_of(conninfo: str) -> float:
    try:
        return float(conninfo_to_dict(conninfo).get("connect_timeout") or DEFAULT_CONNECT_TIMEOUT)
    except (psycopg.Error, ValueError):
        return DEFAULT_CONNECT_TIMEOUT


def _tls_params(tls: Any) -> dict[str, Any]:
    """`tls: true` requires TLS; a mapping names files (ca, cert, key) and the mode."""
    if tls is None or tls is False:
        return {}
    if tls is True:
        return {"sslmode": "require"}
    if not isinstance(tls, Mapping):
        raise ConfigError("the postgres 'tls' setting must be true/false or a mapping")
    names = {"ca": "sslrootcert", "cert": "sslcert", "key": "sslkey", "mode": "sslmode"}
    unknown = sorted(set(tls) - set(names))
    if unknown:
        raise ConfigError(f"unknown postgres tls key(s) {', '.join(unknown)}; "
                          f"known: {', '.join(names)}")
    out = {names[k]: v for k, v in tls.items()}
    out.setdefault("sslmode", "verify-full" if "sslrootcert" in out else "require")
    return out


def backend_for(settings: PostgresSettings | Mapping[str, Any]) -> PostgresBackend:
    """This process's Backend for `settings` (config keys, or PostgresSettings), built
    on first use; nothing connects before a store is used."""
    if not isinstance(settings, PostgresSettings):
        settings = parse_settings(PostgresSettings, "postgres", settings)
    place = _resolve(settings)
    return shared(("postgres", place), lambda: PostgresBackend(place))


# --- the Backend -----------------------------------------------------------------

# What storage.started_event gives every STARTED event, encoded once per claim: the
# fused claim puts each task's id, queue, attempt and event id into it in SQL.
_TEMPLATE_TASK = Task(func="-", id="-", queue="-")
_DAWN = datetime.min.replace(tzinfo=UTC)
_DUSK = datetime.max.replace(tzinfo=UTC)


class PostgresBackend:
    """The three roles on one PostgreSQL database and schema, and their fused writes.

    One per place and process (`backend_for`): one pool and one listener however many
    stores use it, closed when the last of its stores closes. Measured with the
    bench (issue 10): before it, a worker with all three roles opened three pools and
    three LISTEN connections for one DSN, and each task took five sequential trips.
    """

    def __init__(self, place: _Place) -> None:
        self.place = place
        self.where = _describe(place.conninfo)
        tag = hashlib.sha1(place.schema.encode()).hexdigest()[:12]
        # The channels of stores from before issue 10, so mixed versions still wake.
        self._qchan, self._rchan, self._echan = (f"omniq_{tag}_{r}" for r in "qre")
        self._lock = _key(f"omniq-events:{place.schema}")
        self._sql = {name: _compose(text, place.schema) for name, text in _SQL.items()}
        self._connect_timeout = _connect_timeout_of(place.conninfo)
        self._reply_timeout = place.command_timeout
        self._bound: Bound[_State] = Bound(self._new_state, _abandon_state)
        # Tokens of claims we never heard back from -> when their lease ends (monotonic).
        self._unsettled: dict[int, float] = {}
        # Queues a claim found drained: the listener's mark then, and until when
        # (monotonic) nothing falls due there; a claim may wait before looking again.
        self._quiet: dict[tuple[str, ...], tuple[tuple[int, int], float]] = {}
        self._users = 0
        self._forgotten = False
        self._queue: PostgreSQLQueue | None = None
        self._results: PostgreSQLResultStorage | None = None
        self._events: PostgreSQLEventStorage | None = None

    def __repr__(self) -> str:
        return f"PostgresBackend({self.where!r}, schema={self.place.schema!r})"

    # roles

    def queue(self) -> TaskQueue:
        if self._queue is None:
            self._queue = PostgreSQLQueue(backend=self)
        return self._queue

    def results(self) -> ResultStorage:
        if self._results is None:
            self._results = PostgreSQLResultStorage(backend=self)
        return self._results

    def events(self) -> EventStorage:
        if self._events is None:
            self._events = PostgreSQLEventStorage(backend=self)
        return self._events

    def translate(self, exc: BaseException) -> OmniQError | None:
        return translate(exc, self.where)

    # lifecycle

    def _new_state(self) -> _State:
        return _State(self.place.conninfo, self.place.max_size, frozenset({self._rchan}))

    def _attach(self) -> None:
        self._users += 1

    async def _detach(self) -> None:
        """A store closed; the last one closes the pool and the listener."""
        self._users -= 1
        if self._users > 0:
            return
        self._users = 0
        if not self._forgotten:
            self._forgotten = True  # the next store of these settings builds a new one
            forget_shared(("postgres", self.place))
        if self._bound.current() is not None:
            await self._hand_back_unsettled()
            state = self._bound.current()
            if state is not None:
                await state.close()
        self._bound.drop()

    @boundary
    async def open(self) -> None:
        state = await self._ready()
        await state.pool.warm(self.place.min_size)

    async def _ready(self) -> _State:
        state = self._bound.get()
        if not state.migrated:
            async with state.migrating:
                if not state.migrated:
                    await self._migrate(state.pool)
                    state.migrated = True
        return state

    async def _migrate(self, pool: _Pool) -> None:
        async with pool.connection() as conn:
            with contextlib.suppress(psycopg.errors.UndefinedTable,
                                     psycopg.errors.InvalidSchemaName):
                row = await (await conn.execute(self._sql["version"])).fetchone()
                if row and row[0] is not None and row[0] >= SCHEMA_VERSION:
                    return
            # Serialised per schema: concurrent first opens would race on CREATE.
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)",
                                   (_key(f"omniq-migrate:{self.place.schema}"),))
                await conn.execute(self._sql["create_schema"])
                await conn.execute(self._sql["create_version"])
                row = await (await conn.execute(self._sql["version"])).fetchone()
                done = row[0] if row and row[0] is not None else 0
                for version in range(done + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[version - 1]:
                        await conn.execute(_compose_statement(statement, self.place.schema))
                    await conn.execute(self._sql["set_version"], (version,))

    # statements

    async def _execute(self, name: str, params: Params, fetch: str) -> Any:
        """Run one statement on a pooled connection; the hot path, kept flat. Driver
        errors leave untranslated (the stores' boundary translates them)."""
        state = self._bound.current()
        if state is None or not state.migrated:
            state = await self._ready()
        pool = state.pool
        timer = None
        try:
            async with pool.slots:
                conn = await pool.take()
                try:
                    if self._reply_timeout is not None and name not in _UNTIMED:
                        timer = _ReplyTimer(conn, self._reply_timeout)
                    cur = await conn.execute(self._sql[name], params)
                    if fetch == "one":
                        return await cur.fetchone()
                    if fetch == "all":
                        return await cur.fetchall()
                    return cur.rowcount
                finally:
                    if timer is not None:
                        timer.cancel()
                    pool.give_back(conn)
        except psycopg.Error:
            if timer is not None and timer.fired:
                raise BackendUnavailable(
                    f"PostgreSQL at {self.where} is unavailable: no reply within "
                    f"{self._reply_timeout:g} s"
                ) from None
            raise

    async def _one(self, name: str, params: Params = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = await self._execute(name, params, "one")
        return row

    async def _all(self, name: str, params: Params = ()) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self._execute(name, params, "all")
        return rows

    async def _run(self, name: str, params: Params = ()) -> int:
        count: int = await self._execute(name, params, "count")
        return count

    async def _count(self, name: str, params: Params) -> int:
        """The count a statement ending in SELECT count(*) gives."""
        row = await self._one(name, params)
        return int(row[0]) if row else 0

    # waiting

    async def _wait_for(
        self,
        channel: str,
        keys: Sequence[str],
        check: Check[T],
        timeout: float | None,
        from_note: Callable[[str], T | None] | None = None,
        quiet: Callable[[], float | None] | None = None,
    ) -> T | None:
        """Run `check` until it gives a value or `timeout` passes, sleeping between
        checks until a notification for one of `keys` (or a bounded poll). `check`
        also gives the seconds until its answer may change, if it knows; a
        notification with a body is turned into the value by `from_note`. A check
        is skipped while `quiet` says for how long nothing can change (unless a
        notification comes)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        state = self._bound.get()
        listener = state.listener
        while self._bound.current() is state:  # closed (or forked) under us: stop waiting
            budget = self._connect_timeout if deadline is None else deadline - loop.time()
            listening = await listener.ensure(channel, max(0.0, min(budget, self._connect_timeout)))
            fut = listener.watch(channel, keys)
            try:
                asleep = quiet() if quiet is not None and listening else None
                found, hint = (None, asleep) if asleep else await check()
                if found is not None:
                    return found
                pause = self._pause(listening, hint, deadline)
                if pause is None:
                    return None
                await asyncio.wait({fut}, timeout=pause)
                if from_note is not None and fut.done() and (body := fut.result()):
                    found = from_note(body)
                    if found is not None:
                        return found
            finally:
                listener.unwatch(channel, keys, fut)
        return None

    def _pause(self, listening: bool, hint: float | None, deadline: float | None) -> float | None:
        """How long to sleep before the next check; None once the deadline passed."""
        pause = self.place.poll_interval if listening else min(self.place.poll_interval, 0.25)
        if hint is not None:
            pause = min(pause, max(hint, 0.01))
        if deadline is not None:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            pause = min(pause, left)
        return pause

    # writes shared by the stores and the fused operations

    def _task_params(self, task: Task) -> dict[str, Any]:
        payload = encode_task(task)
        # Sealed only if storage.runs_now depends on nothing but its expiry and attempt
        # (asked for the first attempt, at the dawn of time); any other task is decided
        # after decoding, whatever rule runs_now has.
        sealed = runs_now(Delivery(task, 1), _DAWN)
        return {
            "id": task.id, "queue": task.queue, "priority": task.priority, "eta": task.eta,
            "expires": task.expires_at, "max_attempts": min(task.max_retries + 1, 2**31 - 1),
            "digest": hashlib.sha256(_SEAL + payload).digest() if sealed else None,
            "key": task.unique_key, "ttl": task.unique_ttl, "payload": payload,
            "qchan": self._qchan,
        }

    def _event_params(self, event: TaskEvent) -> dict[str, Any]:
        return {"e_id": event.id, "e_task": event.task_id, "e_ts": event.timestamp,
                "e_payload": encode_event(event), "lock": self._lock, "echan": self._echan}

    def _result_params(self, result: TaskResult) -> dict[str, Any]:
        payload = encode_result(result)
        return {"r_task": result.task_id, "r_expires": result.expires_at,
                "r_finished": result.finished_at, "r_ok": result.ok, "r_payload": payload,
                "r_note": _result_note(result.task_id, payload), "rchan": self._rchan}

    async def _put(self, task: Task, event: TaskEvent | None) -> str:
        """Enqueue `task` (with its ENQUEUED `event` in the same statement); the id of
        the task holding its unique key."""
        params = self._task_params(task)
        if event is not None:
            params.update(self._event_params(event))
        if task.unique_key is None:
            await self._run("enqueue" if event is None else "submit", params)
            return task.id
        name = "enqueue_unique" if event is None else "submit_unique"
        for _ in range(3):
            row = await self._one(name, params)
            assert row is not None  # the upsert always returns the key's row
            holder, unfinished = str(row[0]), bool(row[1])
            if holder == task.id or not unfinished:
                return holder
            # Held for an unfinished task (the usual duplicate); unless that task is
            # gone, in which case the key is freed and taken on the next turn.
            if not await self._run("drop_stale_key", (task.unique_key, holder)):
                return holder
        raise BackendError(f"could not enqueue task {task.id}: unique key kept changing hands")

    async def _append(self, events: Sequence[TaskEvent]) -> None:
        await self._run("append", {
            "lock": self._lock,
            "ids": [e.id for e in events],
            "tasks": [e.task_id for e in events],
            "tss": [e.timestamp for e in events],
            "payloads": [encode_event(e) for e in events],
            "echan": self._echan,
        })

    # claims

    async def _take(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int,
        worker_id: str | None,
    ) -> list[Delivery]:
        """Claim up to `limit` tasks, waiting up to `timeout` for the first; with a
        `worker_id`, as a fused claim (STARTED stored, stored results settled)."""
        names = list(queues)
        if not names or limit < 1:
            return []

        async def once() -> tuple[list[Delivery] | None, float | None]:
            return await self._claim_once(names, lease, limit, worker_id)

        if timeout <= 0:
            got, _ = await once()
            return got or []
        def quiet() -> float | None:
            return self._quiet_left(names)

        return await self._wait_for(self._qchan, names, once, timeout, quiet=quiet) or []

    def _note_mark(self) -> tuple[int, int] | None:
        state = self._bound.current()
        return None if state is None else state.listener.mark(self._qchan)

    def _quiet_left(self, queues: list[str]) -> float | None:
        """Seconds a claim may sleep before looking, because the last claim on these
        queues found them drained and no notification came since (an idle worker's
        claim right after a short batch then costs no statement)."""
        found = self._quiet.get(tuple(queues))
        if found is None or found[0] != self._note_mark():
            return None
        left = found[1] - time.monotonic()
        return left if left > 0 else None

    async def _claim_once(
        self, queues: list[str], lease: float, limit: int, worker_id: str | None
    ) -> tuple[list[Delivery] | None, float | None]:
        if self._unsettled:
            found = await self._refind(lease, limit, worker_id)
            if found:
                return found, None
        # Tokens are chosen here, one per delivery, so a claim whose reply is lost
        # can be found again by them.
        tokens = [secrets.randbits(62) for _ in range(limit)]
        params: dict[str, Any] = {"queues": queues, "limit": limit, "tokens": tokens,
                                  "lease": lease}
        if worker_id is not None:
            params.update(self._started_params(worker_id))
        mark = self._note_mark()  # before asking: a note that crosses the reply counts
        try:
            rows = await self._all("claim" if worker_id is None else "claim_started", params)
        except _LOST_REPLY:
            self._unsettle(tokens, lease)
            raise
        got, late, hint = [], [], None
        for row in rows:
            if row[0] is None:  # fewer than asked for: the queues are drained
                hint = row[7]
                self._drained(queues, mark, hint)
                continue
            delivery = _delivery(row[:5])
            got.append(delivery)
            if worker_id is not None and not row[5] and runs_now(delivery):
                late.append(started_event(delivery, worker_id))
        if late:  # rows from before the digest, or payloads of another format
            await self._append_started(got, late, lease)
        return got or None, hint

    def _drained(self, queues: list[str], mark: tuple[int, int] | None, due: float | None) -> None:
        """Nothing of `queues` falls due for `due` seconds (None: nothing waits), unless
        a notification comes after `mark`."""
        if mark is not None:
            wait = _QUIET_MAX if due is None else min(due, _QUIET_MAX)
            self._quiet[tuple(queues)] = (mark, time.monotonic() + wait)

    def _started_params(self, worker_id: str) -> dict[str, Any]:
        now = utcnow()
        template = started_event(Delivery(_TEMPLATE_TASK, 0, 0), worker_id, now)
        return {"ts": now, "now": now, "template": encode_event(template).decode(),
                "seal": _SEAL, "lock": self._lock, "echan": self._echan}

    def _unsettle(self, tokens: Sequence[int], lease: float) -> None:
        end = time.monotonic() + lease
        for token in tokens:
            self._unsettled[token] = end

    async def _append_started(
        self, got: Sequence[Delivery], events: Sequence[TaskEvent], lease: float
    ) -> None:
        """STARTED events SQL could not decide on; if that write fails, the claimed
        tasks are found again (and their STARTED written) by the next claim."""
        try:
            await self._append(events)
        except _LOST_REPLY:
            self._unsettle([d.receipt for d in got], lease)
            raise

    async def _refind(self, lease: float, limit: int, worker_id: str | None) -> list[Delivery]:
        """Claims of ours whose reply was lost, if the server made them and they are
        still ours. Their tokens are taken out while asking, so two concurrent
        claims cannot both hand out the same one."""
        now = time.monotonic()
        pending = {token: end for token, end in self._unsettled.items() if end > now}
        self._unsettled = {}
        if not pending:
            return []
        rows: list[tuple[Any, ...]] = []
        try:
            rows = await self._all("refind", (lease, list(pending), limit))
        finally:
            for row in rows:
                pending.pop(row[4], None)
            self._unsettled.update(pending)
        found = [_delivery(row) for row in rows]
        if worker_id is not None:  # stored by the lost claim, or not: stored once
            late = [started_event(d, worker_id) for d in found if runs_now(d)]
            if late:
                await self._append_started(found, late, lease)
        return found

    async def _hand_back_unsettled(self) -> None:
        """At close, claims we never heard back from go back to their queue at once
        (best effort: otherwise they wait for their lease to end)."""
        pending, self._unsettled = self._unsettled, {}
        now = time.monotonic()
        tokens = [token for token, end in pending.items() if end > now]
        if tokens:
            with contextlib.suppress(psycopg.Error, OmniQError, OSError):
                await self._run("hand_back", (tokens, self._qchan))

    # fused operations (omniq.storage.FusedOps), one statement each

    @boundary
    async def submit(self, task: Task, event: TaskEvent) -> str:
        return await self._put(task, event)

    @boundary
    async def claim(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int, worker_id: str
    ) -> list[Delivery]:
        return await self._take(queues, lease, timeout, limit, worker_id)

    @boundary
    async def finish(
        self, delivery: Delivery, result: TaskResult, event: TaskEvent, *, failed: bool
    ) -> bool:
        params = {**self._result_params(result), **self._event_params(event),
                  "id": delivery.task_id, "token": delivery.receipt}
        return await self._count("finish_dead" if failed else "finish_ack", params) > 0


def _abandon_state(state: _State, forked: bool) -> None:
    state.abandon(forked)


def _result_note(task_id: str, payload: bytes) -> str:
    """The result notification: the task id, framed, and the result when it fits."""
    head = f"{len(task_id)}:{task_id}"
    if len(head.encode()) + len(payload) <= _NOTE_MAX:
        return head + payload.decode()
    return head


def _result_of_note(body: str) -> TaskResult | None:
    """The result a notification carried (None if it no longer counts: re-read)."""
    try:
        result = decode_result(body)
    except BackendError:
        return None
    return None if result.is_expired() else result


# --- stores ----------------------------------------------------------------------


class _Store:
    """A role on a PostgresBackend. Built from settings (the seed's constructors),
    it uses the process's Backend for them."""

    backend: PostgresBackend

    def __init__(
        self, dsn: str | None = None, *, backend: PostgresBackend | None = None, **settings: Any
    ) -> None:
        if backend is None:
            schema = settings.pop("schema", DEFAULT_SCHEMA)
            backend = backend_for(PostgresSettings(dsn=dsn, schema=schema, options=settings))
        self.backend = backend
        self._attached = True
        backend._attach()

    def __repr__(self) -> str:
        b = self.backend
        return f"{type(self).__name__}({b.where!r}, schema={b.place.schema!r})"

    def translate(self, exc: BaseException) -> OmniQError | None:
        return self.backend.translate(exc)

    @boundary
    async def open(self) -> None:
        if not self._attached:  # opened again after close
            self._attached = True
            self.backend._attach()
        await self.backend.open()

    async def close(self) -> None:
        if self._attached:
            self._attached = False
            await self.backend._detach()


class PostgreSQLQueue(_Store):
    """Tasks in one table; a claim is one UPDATE ... FOR UPDATE SKIP LOCKED.

    Every write may be sent again after a lost reply: enqueue is by id, ack/retry/
    release/extend are fenced by the claim token. The claim itself is not
    idempotent, so its tokens are chosen here and a claim whose reply never came is
    looked up by them on the Backend's next claim (while its lease lasts). forget
    and the records are idempotent too.

    Every operator call is one statement: failed() (a page, read by failure time),
    forget() (any number of ids), each record call, and list_records, which a busy
    worker sends once a second for cancel requests (a primary-key range read).
    """

    @boundary
    async def enqueue(self, task: Task) -> str:
        return await self.backend._put(task, None)

    @boundary
    async def dequeue(
        self, queues: Sequence[str], lease: float, timeout: float
    ) -> Delivery | None:
        got = await self.backend._take(queues, lease, timeout, 1, None)
        return got[0] if got else None

    @boundary
    async def dequeue_many(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int
    ) -> list[Delivery]:
        return await self.backend._take(queues, lease, timeout, limit, None)

    @boundary
    async def ack(self, delivery: Delivery, *, failed: bool = False) -> bool:
        params = {"id": delivery.task_id, "token": delivery.receipt}
        return await self.backend._count("dead" if failed else "ack", params) > 0

    @boundary
    async def retry(self, delivery: Delivery, delay: float) -> bool:
        b = self.backend
        params = (max(0.0, delay), delivery.task_id, delivery.receipt, b._qchan)
        return await b._run("retry", params) > 0

    @boundary
    async def release(self, delivery: Delivery, delay: float = 0.0) -> None:
        b = self.backend
        params = (max(0.0, delay), delivery.task_id, delivery.receipt, b._qchan)
        await b._run("release", params)

    @boundary
    async def extend(self, delivery: Delivery, lease: float) -> bool:
        return await self.backend._run("extend", (lease, delivery.task_id, delivery.receipt)) > 0

    @boundary
    async def cancel(self, task_id: str) -> bool:
        if not _storable(task_id):
            return False
        return await self.backend._count("cancel", (task_id,)) > 0

    @boundary
    async def get_task(self, task_id: str) -> Task | None:
        if not _storable(task_id):
            return None
        row = await self.backend._one("get_task", (task_id,))
        if row is None:
            return None
        task, _ = decode_task_or_placeholder(row[0], task_id, row[1])
        return task

    @boundary
    async def stats(self) -> list[QueueStats]:
        rows = await self.backend._all("stats")
        return [
            QueueStats(queue=q, queued=a, scheduled=b, running=c, failed=d, oldest_ready_at=e)
            for q, a, b, c, d, e in rows
        ]

    @boundary
    async def failed(
        self,
        queue: str | None = None,
        since: datetime | None = None,
        before: datetime | None = None,
        limit: int = 100,
    ) -> list[FailedTask]:
        if limit < 1:
            return []
        params = {"queue": queue, "since": since or _DAWN, "before": before or _DUSK,
                  "limit": limit}
        rows = await self.backend._all("failed" if queue is None else "failed_queue", params)
        return [_failed_task(row) for row in rows]

    @boundary
    async def forget(self, task_ids: Sequence[str]) -> int:
        ids = sorted({t for t in task_ids if _storable(t)})
        return await self.backend._count("forget", (ids,)) if ids else 0

    @boundary
    async def put_record(self, kind: str, name: str, data: bytes) -> None:
        check_record_name(kind, name)
        await self.backend._run("put_record", (kind, name, bytes(data)))

    @boundary
    async def get_record(self, kind: str, name: str) -> bytes | None:
        if not _recordable(kind, name):
            return None
        row = await self.backend._one("get_record", (kind, name))
        return None if row is None else bytes(row[0])

    @boundary
    async def list_records(self, kind: str) -> list[tuple[str, bytes]]:
        if not _recordable(kind):
            return []
        return [(row[0], bytes(row[1])) for row in await self.backend._all("list_records", (kind,))]

    @boundary
    async def delete_record(self, kind: str, name: str) -> bool:
        if not _recordable(kind, name):
            return False
        return await self.backend._run("delete_record", (kind, name)) > 0

    @boundary
    async def purge(self, queue: str | None = None) -> int:
        if queue is None:
            return await self.backend._count("purge", ())
        return await self.backend._count("purge_queue", (queue,))

    @boundary
    async def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        await self.backend._run("register", (info.worker_id, ttl, encode_worker(info)))

    @boundary
    async def unregister_worker(self, worker_id: str) -> None:
        await self.backend._run("unregister", (worker_id,))

    @boundary
    async def workers(self) -> list[WorkerInfo]:
        return [decode_worker(row[0]) for row in await self.backend._all("workers")]


class PostgreSQLResultStorage(_Store):
    """One row per task; `store` notifies waiters with the result itself (when it fits
    a notification), so a wait costs one read; get_many is one `= ANY` read."""

    @boundary
    async def store(self, result: TaskResult) -> bool:
        return await self.backend._count("store", self.backend._result_params(result)) > 0

    @boundary
    async def get(self, task_id: str) -> TaskResult | None:
        return await self._get(task_id)

    async def _get(self, task_id: str) -> TaskResult | None:
        if not _storable(task_id):
            return None
        row = await self.backend._one("get_result", (task_id,))
        return None if row is None else decode_result(row[0])

    @boundary
    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        if (timeout is not None and timeout <= 0) or not _storable(task_id):
            return await self._get(task_id)

        async def check() -> tuple[TaskResult | None, None]:
            return await self._get(task_id), None

        b = self.backend
        return await b._wait_for(b._rchan, [task_id], check, timeout, _result_of_note)

    @boundary
    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskResult]:
        ids = sorted({t for t in task_ids if _storable(t)})
        if not ids:
            return {}
        rows = await self.backend._all("get_results", (ids,))
        return {row[0]: decode_result(row[1]) for row in rows}

    @boundary
    async def delete(self, task_id: str) -> bool:
        if not _storable(task_id):
            return False
        return await self.backend._run("delete_result", (task_id,)) > 0

    @boundary
    async def cleanup(self, now: datetime, finished_before: datetime | None = None) -> int:
        if finished_before is None:
            return await self.backend._run("cleanup_results", (now,))
        return await self.backend._run("cleanup_finished", (now, finished_before))


class PostgreSQLEventStorage(_Store):
    """An append-only table; the bigint id is the cursor."""

    @boundary
    async def append(self, event: TaskEvent) -> None:
        await self.backend._run("append_one", self.backend._event_params(event))

    @boundary
    async def append_many(self, events: Sequence[TaskEvent]) -> None:
        if events:
            await self.backend._append(events)

    @boundary
    async def get(self, task_id: str) -> list[TaskEvent]:
        if not _storable(task_id):
            return []
        return [decode_event(row[0]) for row in await self.backend._all("events_of", (task_id,))]

    @boundary
    async def read(self, after: str | None, limit: int) -> list[tuple[str, TaskEvent]]:
        b = self.backend
        rows = await b._all("read", (_cursor_id(after), limit, b._lock))
        return [(_cursor(row[0]), decode_event(row[1])) for row in rows]

    @boundary
    async def latest(self, limit: int, before: str | None = None) -> list[tuple[str, TaskEvent]]:
        if limit <= 0:
            return []
        b = self.backend
        below = _BIGINT_MAX if before is None else _cursor_id(before)
        rows = await b._all("latest", (below, limit, b._lock))
        return [(_cursor(row[0]), decode_event(row[1])) for row in reversed(rows)]

    @boundary
    async def last_cursor(self) -> str | None:
        row = await self.backend._one("last", (self.backend._lock,))
        return None if row is None or row[0] is None else _cursor(row[0])

    @boundary
    async def wait_new(self, after: str | None, timeout: float) -> None:
        since = _cursor_id(after)

        async def exists() -> tuple[bool | None, None]:
            row = await self.backend._one("any_after", (since,))
            return (True if row and row[0] else None), None

        if timeout <= 0:
            await exists()
            return
        await self.backend._wait_for(self.backend._echan, [""], exists, timeout)

    @boundary
    async def cleanup(self, before: datetime) -> int:
        return await self.backend._run("cleanup_events", (before,))


_BIGINT_MAX = 2**63 - 1  # `id < this` is every event: latest() without a cursor


def _storable(task_id: str) -> bool:
    """PostgreSQL text cannot hold NUL, so no such id was ever stored: asking for one
    answers "not found" instead of a driver error."""
    return "\x00" not in task_id


def _recordable(kind: str, name: str = "record") -> bool:
    """Only names check_record_name allows were ever stored: asking for another one
    answers "not found" without a round trip (put_record refuses it)."""
    try:
        check_record_name(kind, name)
    except ValueError:
        return False
    return True


def _failed_task(row: Sequence[Any]) -> FailedTask:
    """A dead letter from a row (id, queue, payload, failed at); one whose payload does
    not decode comes as a placeholder task."""
    task_id, queue, payload, failed_at = row
    task, _ = decode_task_or_placeholder(payload, task_id, queue)
    return FailedTask(task=task, failed_at=failed_at.astimezone(UTC))


def _delivery(row: Sequence[Any]) -> Delivery:
    """A Delivery from a claim's row (id, queue, payload, attempts, token); a payload
    that does not decode is still delivered, with its problem, for the worker to fail."""
    task_id, queue, payload, attempts, token = row
    task, problem = decode_task_or_placeholder(payload, task_id, queue)
    return Delivery(task=task, attempt=int(attempts), receipt=token, problem=problem)


_CURSORS = NumberedCursors(_CURSOR_WIDTH, "PostgreSQL")
_cursor = _CURSORS.format
_cursor_id = _CURSORS.parse


# --- factory -----------------------------------------------------------------


def create(role: Role, settings: Mapping[str, Any]) -> TaskQueue | ResultStorage | EventStorage:
    """An unopened store of `role` on this process's Backend for `settings`."""
    backend = backend_for(settings)
    if role == "queue":
        return PostgreSQLQueue(backend=backend)
    if role == "results":
        return PostgreSQLResultStorage(backend=backend)
    return PostgreSQLEventStorage(backend=backend)
