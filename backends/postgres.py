"""PostgreSQL stores for all three roles: SKIP LOCKED claims, leases, LISTEN/NOTIFY wake-ups.

Layout (one schema, default "omniq", created and migrated on first use): `tasks`
(payload bytes plus queue, priority, seq, state, due, attempts, lease token,
unique_key, unique_ttl), `unique_keys` (who holds a key, and until when once its task
finished), `workers`, `results` (task_id key, expires_at) and `events` (bigint
identity id = cursor, plus the writer's event_id, unique). Each store owns a small
pool and, once something waits, one dedicated LISTEN connection whose notifications
wake waiters in this process; waits still re-check at a bounded interval in case a
notification is lost.

A write may reach the server while its reply is lost (or comes after
`command_timeout`, default 10 s): the caller sees BackendUnavailable and may send it
again, so every write is safe to repeat. Results are created once (the same bytes
again answer True), events are stored once per id, enqueue is by task id, settling
a delivery is fenced by its claim token, and a claim whose reply was lost is found
again by that token on the store's next dequeue. psycopg never re-sends by itself.

Schema names are always quoted, so any name PostgreSQL accepts works (even
`My "odd" schema`); empty, over-long (> 63 bytes), NUL-containing and `pg_*`
names are refused with a ConfigError when the store is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import secrets
import select
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from omniq.errors import BackendError, BackendUnavailable, ConfigError, redact
from omniq.models import Delivery, QueueStats, Task, TaskEvent, TaskResult, WorkerInfo
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
from omniq.storage import NumberedCursors

T = TypeVar("T")
Conn = AsyncConnection[Any]
Params = Sequence[Any] | Mapping[str, Any]

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


def _translate(exc: psycopg.Error, where: str) -> Exception:
    """Driver errors become omniq errors here, and nowhere else."""
    if isinstance(exc, psycopg.OperationalError):
        return BackendUnavailable(f"PostgreSQL at {where} is unavailable: {_first_line(exc)}")
    code = f" [{exc.sqlstate}]" if exc.sqlstate else ""
    return BackendError(f"PostgreSQL error at {where}{code}: {_first_line(exc)}")


@contextlib.contextmanager
def _translated(where: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise _translate(exc, where) from None


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
        self._idle: list[Conn] = []
        self.slots = asyncio.Semaphore(max_size)  # held while a connection is lent
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        async with self.slots:
            conn = await self.take()
            try:
                yield conn
            finally:
                self.give_back(conn)

    async def take(self) -> Conn:
        while self._idle:
            conn = self._idle.pop()
            if not _looks_dead(conn):
                return conn
            _discard(conn)
        return await _connect(self._conninfo)

    def give_back(self, conn: Conn) -> None:
        if (self._closed or conn.closed or conn.broken
                or conn.info.transaction_status != TransactionStatus.IDLE):
            _discard(conn)
        else:
            self._idle.append(conn)

    async def warm(self, count: int) -> None:
        while len(self._idle) < count:
            self._idle.append(await _connect(self._conninfo))

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    def abandon(self, forked: bool) -> None:
        """Forget every connection. A forked child must not close them (that would
        end the parent's sessions); psycopg skips PQfinish outside the creating process."""
        self._closed = True
        idle, self._idle = self._idle, []
        if not forked:
            for conn in idle:
                _discard(conn)


class _Listener:
    """One dedicated LISTEN connection per store; wakes in-process waiters by payload.

    Reconnects by itself. Whenever it (re)starts listening it wakes every waiter,
    because notifications sent while it was away are lost.
    """

    def __init__(self, conninfo: str, channel: str) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._listening = False
        self._heard = False  # the current attempt got as far as LISTEN
        self._tried = asyncio.Event()
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: Conn | None = None

    async def ensure(self, patience: float) -> bool:
        """Start (or hurry) the listener; True once notifications will arrive."""
        if self._listening:
            return True
        self._tried.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"omniq-listen-{self._channel}")
        else:
            self._kick.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tried.wait(), patience)
        return self._listening

    def watch(self, keys: Sequence[str]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key in keys:
            self._waiters.setdefault(key, set()).add(fut)
        return fut

    def unwatch(self, keys: Sequence[str], fut: asyncio.Future[None]) -> None:
        for key in keys:
            waiting = self._waiters.get(key)
            if waiting is not None:
                waiting.discard(fut)
                if not waiting:
                    del self._waiters[key]

    def _wake(self, key: str) -> None:
        for fut in self._waiters.pop(key, ()):
            if not fut.done():
                fut.set_result(None)

    def _wake_all(self) -> None:
        for key in list(self._waiters):
            self._wake(key)

    async def _run(self) -> None:
        delay = 0.05
        while True:
            self._kick.clear()
            self._heard = False
            try:
                await self._listen()
            except (psycopg.Error, OSError, ConfigError) as exc:
                log.debug("LISTEN %s interrupted: %s", self._channel, _first_line(exc))
            delay = 0.05 if self._heard else min(delay * 2, _LISTEN_RETRY_MAX)
            self._tried.set()
            self._wake_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), delay)

    async def _listen(self) -> None:
        conn = self._conn = await _connect(self._conninfo)
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self._listening = self._heard = True
            self._tried.set()
            self._wake_all()
            async for note in conn.notifies():
                self._wake(note.payload)
        finally:
            self._listening = False
            self._conn = None
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

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
    """Everything bound to one process and one event loop."""

    def __init__(self, conninfo: str, channel: str, max_size: int) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.get_running_loop()
        self.pool = _Pool(conninfo, max_size)
        self.listener = _Listener(conninfo, channel)
        self.migrated = False
        self.migrating = asyncio.Lock()

    def current(self) -> bool:
        return self.pid == os.getpid() and self.loop is asyncio.get_running_loop()

    async def close(self) -> None:
        await self.listener.close()
        await self.pool.close()

    def abandon(self) -> None:
        forked = self.pid != os.getpid()
        self.listener.abandon(forked)
        self.pool.abandon(forked)


# --- schema ------------------------------------------------------------------

# Every store migrates the whole schema: the three roles usually share it.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
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
)
SCHEMA_VERSION = len(_MIGRATIONS)

# --- statements ----------------------------------------------------------------

# A dead letter enqueued again starts from scratch; an unfinished task of that id is
# left alone (the statement then returns no row).
_REQUEUE_DEAD = (
    " ON CONFLICT (id) DO UPDATE SET queue = EXCLUDED.queue, priority = EXCLUDED.priority,"
    " due = EXCLUDED.due, unique_key = EXCLUDED.unique_key, unique_ttl = EXCLUDED.unique_ttl,"
    " payload = EXCLUDED.payload, state = 'waiting', attempts = 0, token = NULL, seq = DEFAULT"
    " WHERE t.state = 'failed'"
)
# Whether the existing unique_keys row `k` may go to the task in EXCLUDED: it is that
# task's own, or its hold time has passed. Only `k` itself is consulted: ON CONFLICT
# sees its latest version, while a subquery would see the statement's snapshot, in
# which the holder's task row, committed a moment ago with `k`, may not exist yet.
_KEY_FREE = "(k.task_id = EXCLUDED.task_id OR k.held_until <= now())"
# After a CTE `done` (id, unique_key, unique_ttl) of finished tasks: keep each key
# for its unique_ttl, or free it at once.
_SETTLE_KEYS = (
    ", kept AS (UPDATE {s}.unique_keys k"
    " SET held_until = now() + d.unique_ttl * interval '1 second' FROM done d"
    " WHERE k.unique_key = d.unique_key AND k.task_id = d.id AND d.unique_ttl > 0)"
    ", freed AS (DELETE FROM {s}.unique_keys k USING done d"
    " WHERE k.unique_key = d.unique_key AND k.task_id = d.id"
    " AND NOT coalesce(d.unique_ttl > 0, false))"
    " SELECT count(*) FROM done"
)
# After a CTE `done` (id, unique_key) of removed tasks: cancel and purge free keys at once.
_FREE_KEYS = (
    ", freed AS (DELETE FROM {s}.unique_keys k USING done d"
    " WHERE k.unique_key = d.unique_key AND k.task_id = d.id)"
    " SELECT count(*) FROM done"
)
_DELIVERY = " RETURNING id, queue, payload, attempts, token"

_SQL = {
    "version": "SELECT max(version) FROM {s}.schema_version",
    "create_schema": "CREATE SCHEMA IF NOT EXISTS {s}",
    "create_version": "CREATE TABLE IF NOT EXISTS {s}.schema_version"
    " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    "set_version": "INSERT INTO {s}.schema_version (version) VALUES (%s)",
    # queue
    "enqueue": "INSERT INTO {s}.tasks AS t (id, queue, priority, due, payload)"
    " VALUES (%s, %s, %s, coalesce(%s::timestamptz, now()), %s)"
    + _REQUEUE_DEAD + " RETURNING pg_notify(%s, t.queue)",
    # The key is taken (or found held) in the same statement that stores the task,
    # so two producers of one key cannot both get in. The row is always returned
    # (its holder), at the price of rewriting it when the key was held.
    "enqueue_unique": "WITH held AS (INSERT INTO {s}.unique_keys AS k (unique_key, task_id)"
    " VALUES (%(key)s, %(id)s) ON CONFLICT (unique_key) DO UPDATE SET"
    " task_id = CASE WHEN " + _KEY_FREE + " THEN EXCLUDED.task_id ELSE k.task_id END,"
    " held_until = CASE WHEN " + _KEY_FREE + " THEN NULL ELSE k.held_until END"
    " RETURNING k.task_id, k.held_until IS NULL AS unfinished),"
    " put AS (INSERT INTO {s}.tasks AS t (id, queue, priority, due, unique_key, unique_ttl,"
    " payload) SELECT %(id)s, %(queue)s, %(priority)s, coalesce(%(eta)s::timestamptz, now()),"
    " %(key)s, %(ttl)s, %(payload)s FROM held WHERE held.task_id = %(id)s"
    + _REQUEUE_DEAD + " RETURNING pg_notify(%(channel)s, t.queue))"
    " SELECT task_id, unfinished FROM held",
    # A key held for an unfinished task whose row is gone or dead (deleted by hand,
    # or by an older OmniQ that did not know unique_keys) is stale: drop it. Its own
    # statement, so the snapshot includes the holder's commit.
    "drop_stale_key": "DELETE FROM {s}.unique_keys k WHERE unique_key = %s AND task_id = %s"
    " AND held_until IS NULL AND NOT EXISTS (SELECT 1 FROM {s}.tasks o"
    " WHERE o.id = k.task_id AND o.state <> 'failed')",
    "claim": "UPDATE {s}.tasks SET state = 'running', attempts = attempts + 1, token = %s,"
    " due = now() + %s * interval '1 second'"
    " WHERE id = (SELECT id FROM {s}.tasks WHERE queue = %s AND state <> 'failed'"
    " AND due <= now() ORDER BY priority DESC, seq LIMIT 1 FOR UPDATE SKIP LOCKED)"
    + _DELIVERY,
    # A claim of ours whose reply never came: still ours while its lease runs, and
    # the lease is renewed from now. Its attempt was counted by that claim.
    "refind": "UPDATE {s}.tasks SET due = now() + %s * interval '1 second'"
    " WHERE id = (SELECT id FROM {s}.tasks WHERE token = ANY(%s) AND state = 'running'"
    " AND due > now() LIMIT 1 FOR UPDATE SKIP LOCKED)" + _DELIVERY,
    "hand_back": "UPDATE {s}.tasks SET state = 'waiting', token = NULL, due = now(),"
    " attempts = greatest(attempts - 1, 0)"
    " WHERE token = ANY(%s) AND state = 'running' RETURNING pg_notify(%s, queue)",
    "next_due": "SELECT extract(epoch FROM min(due) - now())::float8 FROM {s}.tasks"
    " WHERE queue = ANY(%s) AND state <> 'failed'",
    "ack": "WITH done AS (DELETE FROM {s}.tasks WHERE id = %s AND token = %s"
    " AND state = 'running' RETURNING id, unique_key, unique_ttl)" + _SETTLE_KEYS,
    "dead": "WITH done AS (UPDATE {s}.tasks SET state = 'failed', token = NULL, due = now()"
    " WHERE id = %s AND token = %s AND state = 'running'"
    " RETURNING id, unique_key, unique_ttl)" + _SETTLE_KEYS,
    "retry": "UPDATE {s}.tasks SET state = 'waiting', token = NULL,"
    " due = now() + %s * interval '1 second'"
    " WHERE id = %s AND token = %s AND state = 'running' RETURNING pg_notify(%s, queue)",
    "release": "UPDATE {s}.tasks SET state = 'waiting', token = NULL, due = now(),"
    " attempts = greatest(attempts - 1, 0)"
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
    " count(*) FILTER (WHERE state = 'failed')"
    " FROM {s}.tasks GROUP BY queue ORDER BY queue",
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
    # results: the first final outcome wins. An expired result gives way; the same
    # bytes again are this very write re-sent after a lost reply, so it answers True.
    "store": "INSERT INTO {s}.results AS r (task_id, expires_at, finished_at, payload)"
    " VALUES (%s, %s, %s, %s) ON CONFLICT (task_id) DO UPDATE SET"
    " expires_at = EXCLUDED.expires_at, finished_at = EXCLUDED.finished_at,"
    " payload = EXCLUDED.payload WHERE r.expires_at <= now() OR r.payload = EXCLUDED.payload"
    " RETURNING pg_notify(%s, r.task_id)",
    "get_result": "SELECT payload FROM {s}.results"
    " WHERE task_id = %s AND (expires_at IS NULL OR expires_at > now())",
    "delete_result": "DELETE FROM {s}.results WHERE task_id = %s",
    "cleanup_results": "DELETE FROM {s}.results WHERE expires_at <= %s",
    "cleanup_finished": "DELETE FROM {s}.results WHERE expires_at <= %s OR finished_at < %s",
    # events: appends take a per-schema lock held until commit, so ids become
    # visible in id order and a reader's cursor never skips a late commit. An
    # event id already stored is dropped (notifying nobody).
    "append": "WITH turn AS (SELECT pg_advisory_xact_lock(%s))"
    " INSERT INTO {s}.events (event_id, task_id, ts, payload)"
    " SELECT u.event_id, u.task_id, u.ts, u.payload FROM turn,"
    " unnest(%s::text[], %s::text[], %s::timestamptz[], %s::bytea[]) WITH ORDINALITY"
    " AS u(event_id, task_id, ts, payload, n) ORDER BY u.n"
    " ON CONFLICT (event_id) DO NOTHING RETURNING pg_notify(%s, '')",
    "append_one": "WITH turn AS (SELECT pg_advisory_xact_lock(%s))"
    " INSERT INTO {s}.events (event_id, task_id, ts, payload) SELECT %s, %s, %s, %s FROM turn"
    " ON CONFLICT (event_id) DO NOTHING RETURNING pg_notify(%s, '')",
    "events_of": "SELECT payload FROM {s}.events WHERE task_id = %s ORDER BY id",
    "read": "SELECT id, payload FROM {s}.events WHERE id > %s ORDER BY id LIMIT %s",
    "latest": "SELECT id, payload FROM {s}.events WHERE id < %s ORDER BY id DESC LIMIT %s",
    "last": "SELECT max(id) FROM {s}.events",
    "any_after": "SELECT EXISTS (SELECT 1 FROM {s}.events WHERE id > %s)",
    "cleanup_events": "DELETE FROM {s}.events WHERE ts < %s",
}
# Bulk maintenance may rightly take long; it is idempotent, so it runs without
# the reply timeout that guards every other statement.
_UNTIMED = frozenset({"purge", "purge_queue", "cleanup_results", "cleanup_finished",
                      "cleanup_events"})


def _compose(text: str, schema: str) -> str:
    return sql.SQL(text).format(s=sql.Identifier(schema)).as_string()


# --- the shared store base ---------------------------------------------------


class _PgStore:
    """Lifecycle, statements, error translation and notification waits for one store."""

    _role = "store"

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = DEFAULT_SCHEMA,
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout: float | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        command_timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
        **conninfo: Any,
    ) -> None:
        if max_size < 1 or min_size < 0 or min_size > max_size:
            raise ConfigError("PostgreSQL pool sizes need 0 <= min_size <= max_size, "
                              f"max_size >= 1 (got {min_size=}, {max_size=})")
        if command_timeout is not None and not command_timeout > 0:
            raise ConfigError("PostgreSQL command_timeout must be a positive number of "
                              f"seconds or null (got {command_timeout!r})")
        self._schema = check_schema(schema)
        self._conninfo = _build_conninfo(dsn or "", connect_timeout, conninfo)
        self._where = _describe(self._conninfo)
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = _connect_timeout_of(self._conninfo)
        self._poll = float(poll_interval)
        self._reply_timeout = None if command_timeout is None else float(command_timeout)
        self._channel = f"omniq_{hashlib.sha1(schema.encode()).hexdigest()[:12]}_{self._role}"
        self._sql = {name: _compose(text, schema) for name, text in _SQL.items()}
        self._state: _State | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where!r}, schema={self._schema!r})"

    # lifecycle

    async def open(self) -> None:
        state = await self._ready()
        with _translated(self._where):
            await state.pool.warm(self._min_size)

    async def close(self) -> None:
        state, self._state = self._state, None
        if state is None:
            return
        if state.current():
            await state.close()
        else:
            state.abandon()

    def _current_state(self) -> _State:
        state = self._state
        if state is None or not state.current():
            if state is not None:
                state.abandon()  # forked, or driven from another event loop now
            state = self._state = _State(self._conninfo, self._channel, self._max_size)
        return state

    async def _ready(self) -> _State:
        state = self._current_state()
        if not state.migrated:
            async with state.migrating:
                if not state.migrated:
                    with _translated(self._where):
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
                                   (_key(f"omniq-migrate:{self._schema}"),))
                await conn.execute(self._sql["create_schema"])
                await conn.execute(self._sql["create_version"])
                row = await (await conn.execute(self._sql["version"])).fetchone()
                done = row[0] if row and row[0] is not None else 0
                for version in range(done + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[version - 1]:
                        await conn.execute(_compose(statement, self._schema))
                    await conn.execute(self._sql["set_version"], (version,))

    # statements

    async def _execute(self, name: str, params: Params, fetch: str) -> Any:
        """Run one statement on a pooled connection; the hot path, kept flat."""
        state = self._state
        if state is None or not state.migrated or not state.current():
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
        except psycopg.Error as exc:
            if timer is not None and timer.fired:
                raise BackendUnavailable(
                    f"PostgreSQL at {self._where} is unavailable: no reply within "
                    f"{self._reply_timeout:g} s"
                ) from None
            raise _translate(exc, self._where) from None

    async def _one(self, name: str, params: Params = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = await self._execute(name, params, "one")
        return row

    async def _all(self, name: str, params: Params = ()) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self._execute(name, params, "all")
        return rows

    async def _run(self, name: str, params: Params = ()) -> int:
        count: int = await self._execute(name, params, "count")
        return count

    # waiting

    async def _wait_for(
        self,
        keys: Sequence[str],
        check: Callable[[], Awaitable[T | None]],
        timeout: float | None,
        pause_hint: Callable[[], Awaitable[float | None]] | None = None,
    ) -> T | None:
        """Run `check` until it gives a value or `timeout` passes, sleeping between
        checks until a notification for one of `keys` (or a bounded poll)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        state = self._current_state()
        listener = state.listener
        while self._state is state:  # closed (or forked) under us: stop waiting
            budget = self._connect_timeout if deadline is None else deadline - loop.time()
            listening = await listener.ensure(max(0.0, min(budget, self._connect_timeout)))
            fut = listener.watch(keys)
            try:
                found = await check()
                if found is not None:
                    return found
                pause = self._poll if listening else min(self._poll, 0.25)
                if deadline is not None:
                    pause = min(pause, deadline - loop.time())
                    if pause <= 0:
                        return None
                if pause_hint is not None:
                    hint = await pause_hint()
                    if hint is not None:
                        pause = min(pause, max(hint, 0.01))
                await asyncio.wait({fut}, timeout=pause)
            finally:
                listener.unwatch(keys, fut)
        return None


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


# --- queue -------------------------------------------------------------------


class PostgreSQLQueue(_PgStore):
    """Tasks in one table; a claim is one UPDATE ... FOR UPDATE SKIP LOCKED.

    Every write may be sent again after a lost reply: enqueue is by id, ack/retry/
    release/extend are fenced by the claim token. The claim itself is not
    idempotent, so the token is chosen here and a claim whose reply never came is
    looked up by that token on this store's next dequeue (while its lease lasts).
    """

    _role = "q"

    def __init__(self, dsn: str | None = None, **kwargs: Any) -> None:
        super().__init__(dsn, **kwargs)
        # Tokens of claims we never heard back from -> when their lease ends (monotonic).
        self._unsettled: dict[int, float] = {}

    async def close(self) -> None:
        await self._hand_back_unsettled()
        await super().close()

    async def enqueue(self, task: Task) -> str:
        payload = encode_task(task)
        if task.unique_key is None:
            await self._run("enqueue", (task.id, task.queue, task.priority, task.eta,
                                        payload, self._channel))
            return task.id
        params = {"id": task.id, "queue": task.queue, "priority": task.priority,
                  "eta": task.eta, "key": task.unique_key, "ttl": task.unique_ttl,
                  "payload": payload, "channel": self._channel}
        for _ in range(3):
            row = await self._one("enqueue_unique", params)
            assert row is not None  # the upsert always returns the key's row
            holder, unfinished = str(row[0]), bool(row[1])
            if holder == task.id or not unfinished:
                return holder
            # Held for an unfinished task (the usual duplicate); unless that task is
            # gone, in which case the key is freed and taken on the next turn.
            if not await self._run("drop_stale_key", (task.unique_key, holder)):
                return holder
        raise BackendError(f"could not enqueue task {task.id}: unique key kept changing hands")

    async def dequeue(
        self, queues: Sequence[str], lease: float, timeout: float
    ) -> Delivery | None:
        names = list(queues)
        if timeout <= 0:
            return await self._claim(names, lease)
        return await self._wait_for(
            names, lambda: self._claim(names, lease), timeout, lambda: self._next_due(names)
        )

    async def _claim(self, queues: Sequence[str], lease: float) -> Delivery | None:
        if self._unsettled:
            found = await self._refind(lease)
            if found is not None:
                return found
        # One short statement per queue keeps each claim on the index; the
        # common single-queue worker pays one round trip.
        for queue in queues:
            token = secrets.randbits(62)
            try:
                row = await self._one("claim", (token, lease, queue))
            except (BackendUnavailable, asyncio.CancelledError):
                # The server may have taken the lease all the same.
                self._unsettled[token] = time.monotonic() + lease
                raise
            if row is not None:
                return _delivery(row)
        return None

    async def _refind(self, lease: float) -> Delivery | None:
        """A claim of ours whose reply was lost, if the server made it and it is
        still ours. Its tokens are taken out while asking, so two concurrent
        dequeue calls cannot both hand out the same one."""
        now = time.monotonic()
        pending = {token: end for token, end in self._unsettled.items() if end > now}
        self._unsettled = {}
        if not pending:
            return None
        row = None
        try:
            row = await self._one("refind", (lease, list(pending)))
        finally:
            if row is not None:
                pending.pop(row[4], None)
            self._unsettled.update(pending)
        return None if row is None else _delivery(row)

    async def _hand_back_unsettled(self) -> None:
        """At close, claims we never heard back from go back to their queue at once
        (best effort: otherwise they wait for their lease to end)."""
        pending, self._unsettled = self._unsettled, {}
        now = time.monotonic()
        tokens = [token for token, end in pending.items() if end > now]
        state = self._state
        if not tokens or state is None or not state.current():
            return
        with contextlib.suppress(BackendError, BackendUnavailable, ConfigError):
            await self._run("hand_back", (tokens, self._channel))

    async def _next_due(self, queues: Sequence[str]) -> float | None:
        row = await self._one("next_due", (list(queues),))
        return None if row is None or row[0] is None else float(row[0])

    async def ack(self, delivery: Delivery, *, failed: bool = False) -> bool:
        row = await self._one("dead" if failed else "ack", (delivery.task_id, delivery.receipt))
        return bool(row and row[0])

    async def retry(self, delivery: Delivery, delay: float) -> bool:
        return await self._run("retry", (max(0.0, delay), delivery.task_id, delivery.receipt,
                                         self._channel)) > 0

    async def release(self, delivery: Delivery) -> None:
        await self._run("release", (delivery.task_id, delivery.receipt, self._channel))

    async def extend(self, delivery: Delivery, lease: float) -> bool:
        return await self._run("extend", (lease, delivery.task_id, delivery.receipt)) > 0

    async def cancel(self, task_id: str) -> bool:
        if not _storable(task_id):
            return False
        row = await self._one("cancel", (task_id,))
        return bool(row and row[0])

    async def get_task(self, task_id: str) -> Task | None:
        if not _storable(task_id):
            return None
        row = await self._one("get_task", (task_id,))
        if row is None:
            return None
        task, _ = decode_task_or_placeholder(row[0], task_id, row[1])
        return task

    async def stats(self) -> list[QueueStats]:
        rows = await self._all("stats")
        return [
            QueueStats(queue=q, queued=a, scheduled=b, running=c, failed=d)
            for q, a, b, c, d in rows
        ]

    async def purge(self, queue: str | None = None) -> int:
        row = await (self._one("purge") if queue is None else self._one("purge_queue", (queue,)))
        return int(row[0]) if row else 0

    async def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        await self._run("register", (info.worker_id, ttl, encode_worker(info)))

    async def unregister_worker(self, worker_id: str) -> None:
        await self._run("unregister", (worker_id,))

    async def workers(self) -> list[WorkerInfo]:
        return [decode_worker(row[0]) for row in await self._all("workers")]


# --- results -----------------------------------------------------------------


class PostgreSQLResultStorage(_PgStore):
    """One row per task; `store` notifies the task id so waiters wake at once."""

    _role = "r"

    async def store(self, result: TaskResult) -> bool:
        return await self._run("store", (result.task_id, result.expires_at, result.finished_at,
                                         encode_result(result), self._channel)) > 0

    async def get(self, task_id: str) -> TaskResult | None:
        if not _storable(task_id):
            return None
        row = await self._one("get_result", (task_id,))
        return None if row is None else decode_result(row[0])

    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        if (timeout is not None and timeout <= 0) or not _storable(task_id):
            return await self.get(task_id)
        return await self._wait_for([task_id], lambda: self.get(task_id), timeout)

    async def delete(self, task_id: str) -> bool:
        if not _storable(task_id):
            return False
        return await self._run("delete_result", (task_id,)) > 0

    async def cleanup(self, now: datetime, finished_before: datetime | None = None) -> int:
        if finished_before is None:
            return await self._run("cleanup_results", (now,))
        return await self._run("cleanup_finished", (now, finished_before))


# --- events ------------------------------------------------------------------


class PostgreSQLEventStorage(_PgStore):
    """An append-only table; the bigint id is the cursor."""

    _role = "e"

    @functools.cached_property
    def _lock_key(self) -> int:
        return _key(f"omniq-events:{self._schema}")

    async def append(self, event: TaskEvent) -> None:
        await self._run("append_one", (self._lock_key, event.id, event.task_id, event.timestamp,
                                       encode_event(event), self._channel))

    async def append_many(self, events: Sequence[TaskEvent]) -> None:
        if not events:
            return
        await self._run("append", (
            self._lock_key,
            [e.id for e in events],
            [e.task_id for e in events],
            [e.timestamp for e in events],
            [encode_event(e) for e in events],
            self._channel,
        ))

    async def get(self, task_id: str) -> list[TaskEvent]:
        if not _storable(task_id):
            return []
        return [decode_event(row[0]) for row in await self._all("events_of", (task_id,))]

    async def read(self, after: str | None, limit: int) -> list[tuple[str, TaskEvent]]:
        rows = await self._all("read", (_cursor_id(after), limit))
        return [(_cursor(row[0]), decode_event(row[1])) for row in rows]

    async def latest(self, limit: int, before: str | None = None) -> list[tuple[str, TaskEvent]]:
        if limit <= 0:
            return []
        below = _BIGINT_MAX if before is None else _cursor_id(before)
        rows = await self._all("latest", (below, limit))
        return [(_cursor(row[0]), decode_event(row[1])) for row in reversed(rows)]

    async def last_cursor(self) -> str | None:
        row = await self._one("last")
        return None if row is None or row[0] is None else _cursor(row[0])

    async def wait_new(self, after: str | None, timeout: float) -> None:
        since = _cursor_id(after)

        async def exists() -> bool | None:
            row = await self._one("any_after", (since,))
            return True if row and row[0] else None

        if timeout <= 0:
            await exists()
            return
        await self._wait_for([""], exists, timeout)

    async def cleanup(self, before: datetime) -> int:
        return await self._run("cleanup_events", (before,))


_BIGINT_MAX = 2**63 - 1  # `id < this` is every event: latest() without a cursor


def _storable(task_id: str) -> bool:
    """PostgreSQL text cannot hold NUL, so no such id was ever stored: asking for one
    answers "not found" instead of a driver error."""
    return "\x00" not in task_id


def _delivery(row: tuple[Any, ...]) -> Delivery:
    """A Delivery from a claim's row (id, queue, payload, attempts, token); a payload
    that does not decode is still delivered, with its problem, for the worker to fail."""
    task_id, queue, payload, attempts, token = row
    task, problem = decode_task_or_placeholder(payload, task_id, queue)
    return Delivery(task=task, attempt=int(attempts), receipt=token, problem=problem)


_CURSORS = NumberedCursors(_CURSOR_WIDTH, "PostgreSQL")
_cursor = _CURSORS.format
_cursor_id = _CURSORS.parse


# --- factory -----------------------------------------------------------------

_CLASSES: dict[str, type[_PgStore]] = {
    "queue": PostgreSQLQueue,
    "results": PostgreSQLResultStorage,
    "events": PostgreSQLEventStorage,
}
_STORE_OPTIONS = {"min_size", "max_size", "connect_timeout", "poll_interval", "command_timeout"}


def create(role: Role, settings: Mapping[str, Any]) -> Any:
    """Build an unopened store. `dsn` (or `url`) wins; host/port/db/username/password
    fill in or override its parts; `options` carries pool settings and libpq parameters."""
    dsn = settings.get("dsn") or settings.get("url") or ""
    options = dict(settings.get("options") or {})
    store_kw = {k: options.pop(k) for k in list(options) if k in _STORE_OPTIONS}
    params = {
        "host": settings.get("host"),
        "port": settings.get("port"),
        "dbname": settings.get("db"),
        "user": settings.get("username"),
        "password": settings.get("password"),
        **_tls_params(settings.get("tls")),
        **options,
    }
    params = {k: v for k, v in params.items() if v is not None}
    if not dsn and not params:
        raise ConfigError(f"the postgres {role} store needs a DSN (setting 'dsn')")
    return _CLASSES[role](dsn, schema=settings.get("schema", DEFAULT_SCHEMA),
                          **store_kw, **params)


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
