"""NATS JetStream stores: tasks in a work-queue stream, state and results in KV, events in a stream.

Layout for prefix P (all created on first use, idempotently):

- stream ``P_tasks`` (work-queue retention), subject ``P.tasks.<queue>.<priority>``,
  one durable pull consumer per (queue, priority): JetStream has no priorities,
  so each level is its own lane and lanes are tried highest first.
- KV bucket ``P_queue``: ``t.<task id>`` holds the task with its state in
  headers (waiting / running / failed / cancelled, attempts, ready and lease
  times). Claims, leases, cancels and dead letters are compare-and-set writes
  on this key, so the stream only dispatches and the key decides.
  ``u.<unique key>`` -> task id, ``w.<worker id>`` -> worker registry.
- KV bucket ``P_results``: one key per task; ``wait`` is pushed by a
  subscription on the key's subject.
- stream ``P_events``: subject ``P.events.<task id>``; the cursor is the stream sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import ssl
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from omniq.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    CorruptRecord,
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
    is_queue_name,
)
from omniq.registry import Role
from omniq.serialization import (
    decode_event,
    decode_result,
    decode_task,
    decode_task_or_placeholder,
    decode_worker,
    encode_event,
    encode_result,
    encode_task,
    encode_worker,
)
from omniq.storage import NumberedCursors

log = logging.getLogger("omniq.backends.nats")

DEFAULT_SERVERS = ("nats://localhost:4222",)
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")

CONNECT_TIMEOUT = 2.0  # per attempt; nats-py tries each server twice on open
OPEN_BUDGET = 6.0  # a failed open gives up after this, whatever nats-py would do
RECONNECT_WAIT = 1.0  # between reconnect attempts once a connection was up
REQUEST_TIMEOUT = 5.0
# Consumer AckWait: how long a pulled message stays away when nobody settles it: one that
# a process fetched and then died before claiming it or handing it back, or one whose
# lease NAK was lost. Short, so a worker killed by a task does not hold the tasks it had
# prefetched for long (issue 8, item 2); a claimed task's lease is set on its message with
# a delayed NAK instead (one fire-and-forget publish per claim, no round trip).
ACK_WAIT = 5.0
HOLD = 1.0  # pulled messages nobody claimed go back to the stream after this
FRESH = 0.1  # a lane the server just called empty is skipped this long, unless woken
MAX_BATCH = 64
LEVEL_REFRESH = 10.0  # re-discover the priority levels of a queue this often
ETA_SLACK = 0.005
POLL_MARGIN = 0.02  # long polls end this much before the caller's deadline
SCAN_BATCH = 256
SCAN_IDLE = 30.0
RESULT_RECHECK = 2.0  # a result wait re-reads its key this often (covers reconnect gaps)
CHUNK = 32  # concurrent requests in bulk maintenance (purge, cleanup)
# How long the events stream remembers event ids (Nats-Msg-Id) to drop a copy sent again.
# A write whose reply was lost is sent again within seconds (the worker's retries back off
# to 10 s), or once the server is reachable again; after this window a second copy would
# be stored. The server keeps the ids of the window in memory (~100 bytes each), so 5
# minutes at 1,000 events/s is ~30 MB: longer is not free.
EVENT_DEDUPE_WINDOW = 300.0

# Headers on task-state and result entries, so scans can read them headers-only.
H_STATE = "Omniq-State"
H_QUEUE = "Omniq-Queue"
H_ATTEMPTS = "Omniq-Attempts"
H_READY = "Omniq-Ready"
H_LEASE = "Omniq-Lease"
H_UNIQUE = "Omniq-Unique"
H_UNTIL = "Omniq-Until"
H_EXPIRES = "Omniq-Expires"
H_FINISHED = "Omniq-Finished"
H_TS = "Omniq-Ts"
H_ID = "Omniq-Id"
H_PRIORITY = "Omniq-Priority"
H_UNIQUE_TTL = "Omniq-Unique-Ttl"
H_CLAIM = "Omniq-Claim"  # the token of the lease holder that wrote the entry
# Headers on task messages.
H_REV = "Omniq-Rev"
H_ETA = "Omniq-Eta"

WAITING, RUNNING, FAILED, CANCELLED = "waiting", "running", "failed", "cancelled"
_WRONG_LAST_SEQ = (10071, 10164)
_SUBJECTS_OVERLAP = 10065  # another stream already takes these subjects
_STREAM_IN_USE = 10058
_KV_DELETED = ("DEL", "PURGE")


# --- names ----------------------------------------------------------------


def _check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ConfigError(
            f"NATS prefix {prefix!r} is not valid: stream and bucket names allow only "
            "letters, digits, '_' and '-' (1-64 characters)"
        )
    return prefix


def _tok(text: str) -> str:
    """Free text as one subject token / KV key: itself when plain, else '=' + a hash."""
    if _PLAIN_TOKEN.fullmatch(text):
        return text
    return "=" + hashlib.sha256(text.encode()).hexdigest()[:40]


def _qtok(queue: str) -> str:
    """A queue name as one token: readable and reversible ('_' -> '__', '.' -> '_d')."""
    if not is_queue_name(queue):
        return _tok(queue)
    return queue.replace("_", "__").replace(".", "_d")


def _ptok(priority: int) -> str:
    return f"p{priority}" if priority >= 0 else f"n{-priority}"


def _parse_ptok(token: str) -> int | None:
    if len(token) > 1 and token[0] in "pn" and token[1:].isdigit():
        return int(token[1:]) * (1 if token[0] == "p" else -1)
    return None


def _task_key(task_id: str) -> str:
    return "t." + _tok(task_id)


def _unique_key(key: str) -> str:
    return "u." + _tok(key)


def _worker_key(worker_id: str) -> str:
    return "w." + _tok(worker_id)


def _status(msg: Msg) -> str | None:
    return msg.headers.get("Status") if msg.headers else None


def _nak_payload(delay: float) -> bytes:
    if delay <= 0:
        return b"-NAK"
    return b"-NAK " + json.dumps({"delay": int(delay * 1e9)}).encode()


# --- errors ---------------------------------------------------------------

_UNAVAILABLE = (
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.AuthorizationError,
    nats.errors.ConnectionDrainingError,
    OSError,
)


def _translate(exc: Exception, where: str, timeout: float) -> OmniQError | None:
    """The omniq error for a driver exception, or None for a bug of ours."""
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return BackendUnavailable(
            f"JetStream at {where} is unavailable (503); is nats-server running with -js?"
        )
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return BackendError(f"no JetStream stream answered at {where} (deleted meanwhile?)")
    if isinstance(exc, nats.js.errors.APIError):
        return BackendError(
            f"JetStream at {where} refused the request: {exc.description} (code {exc.err_code})"
        )
    if isinstance(exc, TimeoutError):
        return BackendUnavailable(f"NATS at {where} did not answer within {timeout:g}s")
    if isinstance(exc, _UNAVAILABLE):
        return BackendUnavailable(f"NATS at {where} is unavailable: {_describe(exc)}")
    if isinstance(exc, nats.errors.Error):
        return BackendError(f"NATS error at {where}: {_describe(exc)}")
    return None


def _is_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or "Authorization" in str(exc)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().removeprefix("nats: ").strip("'")
    return redact(text) if text else type(exc).__name__


S = TypeVar("S", bound="_Store")
P = ParamSpec("P")
R = TypeVar("R")


Method = Callable[Concatenate[S, P], Awaitable[R]]


def _boundary(fn: Method[S, P, R]) -> Method[S, P, R]:
    """Translate driver exceptions of a public method into omniq errors."""

    @functools.wraps(fn)
    async def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(self, *args, **kwargs)
        except OmniQError:
            raise
        except Exception as exc:
            if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.js.errors.NotFoundError):
                self._needs_setup = True  # an admin deleted a stream: recreate it on next use
            translated = _translate(exc, self._conn.where, self._conn.timeout)
            if translated is None:
                raise
            raise translated from exc

    return wrapper


# --- connection -------------------------------------------------------------


class _Connection:
    """One NATS connection: bounded first connect, endless reconnects once up, fork-aware."""

    def __init__(
        self, servers: list[str], options: dict[str, Any], timeout: float = REQUEST_TIMEOUT
    ) -> None:
        self.servers = servers
        self.timeout = timeout  # per request: a reply later than this counts as lost
        self.where = redact(", ".join(servers))
        self._options = options
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._last_error: BaseException | None = None
        self._errors: list[BaseException] = []  # every error reported while connecting

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise BackendUnavailable(f"NATS connection to {self.where} is not open")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BackendUnavailable(f"NATS connection to {self.where} is not open")
        return self._js

    def usable(self) -> bool:
        return (
            self._nc is not None
            and not self._nc.is_closed
            and self._pid == os.getpid()
            and self._loop is asyncio.get_running_loop()
        )

    def lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock[0] is not loop:
            self._lock = (loop, asyncio.Lock())
        return self._lock[1]

    def url(self) -> str:
        """The server actually connected to, without credentials."""
        u = self._nc.connected_url if self._nc is not None else None
        if u is None:
            return self.where
        return f"{u.scheme}://{u.hostname}:{u.port}"

    async def connect(self) -> None:
        # Drop, never close, a connection from a parent process or another loop:
        # its socket and tasks are not ours to touch.
        self._nc = self._js = None
        nc = NATS()
        self._last_error = None
        self._errors = []
        try:
            await asyncio.wait_for(nc.connect(**self._connect_args()), OPEN_BUDGET)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 1.0)
            raise BackendUnavailable(self._refusal(exc)) from None
        # Bounded while opening; once up, ride out server restarts in the background.
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = RECONNECT_WAIT
        self._nc, self._js = nc, nc.jetstream(timeout=self.timeout)
        self._pid, self._loop = os.getpid(), asyncio.get_running_loop()

    def _connect_args(self) -> dict[str, Any]:
        return {
            "servers": self.servers,
            "name": "omniq",
            "connect_timeout": CONNECT_TIMEOUT,
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.1,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnect,
            "reconnected_cb": self._on_reconnect,
            **self._options,
        }

    def _refusal(self, exc: BaseException) -> str:
        # The server may close the socket right after its -ERR, so a later attempt's
        # "connection reset" can follow the authorization error: any one seen wins.
        if any(_is_auth_error(e) for e in (*self._errors, exc)):
            return f"NATS at {self.where} refused the credentials (authorization violation)"
        reason = self._last_error or exc
        if isinstance(reason, ConnectionRefusedError):
            return f"cannot connect to NATS at {self.where}: connection refused"
        if isinstance(reason, TimeoutError):
            return f"cannot connect to NATS at {self.where}: no answer within {CONNECT_TIMEOUT:g}s"
        return f"cannot connect to NATS at {self.where}: {_describe(reason)}"

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        self._errors.append(exc)
        log.debug("NATS %s: %s", self.where, _describe(exc))

    async def _on_disconnect(self) -> None:
        # Debug only: each store has a connection, and the worker reports an outage once.
        if self._nc is not None and not self._nc.is_closed:
            log.debug("lost the connection to NATS at %s; reconnecting", self.where)

    async def _on_reconnect(self) -> None:
        log.debug("reconnected to NATS at %s", self.url())

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is None or self._pid != os.getpid():
            return
        with contextlib.suppress(Exception):
            if self._loop is asyncio.get_running_loop():
                await asyncio.wait_for(nc.close(), 2.0)


def _connect_options(
    username: str | None,
    password: str | None,
    token: str | None,
    tls: bool | ssl.SSLContext | None,
    options: Mapping[str, Any] | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if username is not None:
        out["user"] = username
    if password is not None:
        out["password"] = password
    if token is not None:
        out["token"] = token
    if isinstance(tls, ssl.SSLContext):
        out["tls"] = tls
    elif tls:
        out["tls"] = ssl.create_default_context()
    out.update(options or {})
    return out


def _server_list(servers: Sequence[str] | str) -> list[str]:
    found = [servers] if isinstance(servers, str) else list(servers)
    found = [s.strip() for s in found if s and s.strip()]
    if not found:
        raise ConfigError("NATS needs at least one server URL, e.g. nats://localhost:4222")
    return found


# --- JetStream primitives ---------------------------------------------------


async def _api(conn: _Connection, subject: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """One JetStream API request; errors raised as nats-py's APIError family."""
    try:
        msg = await conn.nc.request(subject, json.dumps(payload).encode(), timeout=conn.timeout)
    except nats.errors.NoRespondersError:
        raise nats.js.errors.ServiceUnavailableError from None
    data: dict[str, Any] = json.loads(msg.data)
    if "error" in data:
        nats.js.errors.APIError.from_error(data["error"])
    return data


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    """Create the stream unless it exists; concurrent creators with one config all succeed."""
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError as exc:
        await _created_by_someone_else(js, config.name or "", exc)
        # Exists with other settings (an admin's edits, an older omniq): use it as it is.


async def _widen_dedupe_window(js: JetStreamContext, stream: str, window: float) -> None:
    """Give a stream made by an older omniq (the server's 2 minute default) our window."""
    info = await js.stream_info(stream)
    config = info.config
    if config.duplicate_window is not None and config.duplicate_window >= window:
        return
    config.duplicate_window = window
    with contextlib.suppress(nats.js.errors.BadRequestError):  # an admin's limits: keep them
        await js.update_stream(config)


async def _ensure_bucket(js: JetStreamContext, name: str) -> None:
    try:
        await js.create_key_value(bucket=name, history=1, direct=True)
    except nats.js.errors.BadRequestError as exc:
        await _created_by_someone_else(js, f"KV_{name}", exc)


async def _created_by_someone_else(
    js: JetStreamContext, stream: str, exc: nats.js.errors.BadRequestError
) -> None:
    """Re-raise unless the stream exists now. A creator racing another one gets
    "name in use", or, when the other one won a moment earlier, "subjects overlap"."""
    if exc.err_code == _STREAM_IN_USE:
        return
    if exc.err_code == _SUBJECTS_OVERLAP:
        try:
            await js.stream_info(stream)
            return
        except nats.js.errors.NotFoundError:
            pass
    raise exc


async def _purge(
    conn: _Connection, stream: str, subject: str | None, below: int | None = None
) -> int:
    """Remove every message of `subject` (optionally only below a sequence); no markers left."""
    req: dict[str, Any] = {}
    if subject is not None:
        req["filter"] = subject
    if below is not None:
        req["seq"] = below
    data = await _api(conn, f"$JS.API.STREAM.PURGE.{stream}", req)
    return int(data.get("purged", 0))


async def _scan(
    conn: _Connection,
    stream: str,
    subject: str,
    *,
    last_only: bool = False,
    headers_only: bool = False,
    start_seq: int | None = None,
    limit: int | None = None,
) -> AsyncIterator[Msg]:
    """Messages of `subject` in stream order through a short-lived ephemeral consumer."""
    nc, js = conn.nc, conn.js
    if last_only:
        policy = api.DeliverPolicy.LAST_PER_SUBJECT
    else:
        policy = api.DeliverPolicy.BY_START_SEQUENCE if start_seq else api.DeliverPolicy.ALL
    config = api.ConsumerConfig(
        deliver_policy=policy,
        opt_start_seq=start_seq if policy == api.DeliverPolicy.BY_START_SEQUENCE else None,
        ack_policy=api.AckPolicy.NONE,
        filter_subject=subject,
        headers_only=headers_only or None,
        inactive_threshold=SCAN_IDLE,
        mem_storage=True,
    )
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    info = await js.add_consumer(stream, config)
    try:
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{info.name}"
        async for msg in _drain(conn, sub, next_subject, limit):
            yield msg
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, info.name)


async def _drain(
    conn: _Connection, sub: Subscription, next_subject: str, limit: int | None
) -> AsyncIterator[Msg]:
    nc = conn.nc
    left = math.inf if limit is None else limit
    while left > 0:
        size = int(min(SCAN_BATCH, left))
        await nc.publish(next_subject, json.dumps({"batch": size, "no_wait": True}).encode(),
                         reply=sub.subject)
        got = 0
        while got < size:
            msg = await sub.next_msg(timeout=conn.timeout)
            status = _status(msg)
            if status == "100":
                continue
            if status is not None:
                return  # 404 / 408: everything there was has been delivered
            got += 1
            left -= 1
            yield msg
            if msg.metadata.num_pending == 0:
                return


@dataclass(frozen=True)
class _Entry:
    """One KV value with its revision and headers."""

    key: str
    rev: int
    data: bytes
    headers: Mapping[str, str]

    def text(self, name: str) -> str:
        return self.headers.get(name, "")

    def number(self, name: str) -> float:
        value = self.headers.get(name)
        return float(value) if value else 0.0

    @property
    def state(self) -> str:
        return self.text(H_STATE)

    @property
    def queue(self) -> str:
        return self.text(H_QUEUE)

    @property
    def attempts(self) -> int:
        return int(self.number(H_ATTEMPTS))


class _Bucket:
    """The KV primitives we need, as raw JetStream calls: direct get, compare-and-set, purge.

    Keys are removed by purging their subject rather than with KV delete markers:
    a marker per finished task would stay in the bucket forever.
    """

    def __init__(self, conn: _Connection, name: str) -> None:
        self._conn = conn
        self.name = name
        self.stream = f"KV_{name}"
        self.pre = f"$KV.{name}."

    def subject(self, key: str) -> str:
        return self.pre + key

    async def get(self, key: str) -> _Entry | None:
        msg = await self._conn.nc.request(
            f"$JS.API.DIRECT.GET.{self.stream}.{self.pre}{key}", b"", timeout=self._conn.timeout
        )
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "404":
            return None
        if status:
            nats.js.errors.APIError.from_msg(msg)
        if headers.get("KV-Operation") in _KV_DELETED:
            return None
        return _Entry(key, int(headers["Nats-Sequence"]), msg.data, headers)

    async def put(
        self, key: str, data: bytes, headers: Mapping[str, str], last: int | None = None
    ) -> int | None:
        """Write; with `last`, only if the key is still at that revision (0 = absent).

        Returns the new revision, or None when the compare-and-set lost."""
        hdrs = dict(headers)
        if last is not None:
            hdrs["Nats-Expected-Last-Subject-Sequence"] = str(last)
        try:
            ack = await self._conn.js.publish(self.pre + key, data, headers=hdrs or None)
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQ:
                return None
            raise
        return int(ack.seq)

    async def purge(self, key: str) -> bool:
        return await _purge(self._conn, self.stream, self.pre + key) > 0

    async def purge_at(self, key: str, rev: int) -> bool:
        """Remove the key only while it is still at revision `rev`: a fenced delete in one
        request. With history 1 a newer write has already replaced `rev`, so purging the
        subject's messages up to `rev` finds nothing then."""
        return await _purge(self._conn, self.stream, self.pre + key, below=rev + 1) > 0

    async def scan(self, pattern: str, *, headers_only: bool) -> AsyncIterator[_Entry]:
        async for msg in _scan(
            self._conn, self.stream, self.pre + pattern, last_only=True, headers_only=headers_only
        ):
            headers = msg.headers or {}
            if headers.get("KV-Operation") in _KV_DELETED:
                continue
            key = msg.subject[len(self.pre):]
            yield _Entry(key, msg.metadata.sequence.stream, msg.data, headers)


async def _in_chunks(items: Sequence[Any], fn: Callable[[Any], Awaitable[R]]) -> list[R]:
    out: list[R] = []
    for i in range(0, len(items), CHUNK):
        out.extend(await asyncio.gather(*(fn(item) for item in items[i : i + CHUNK])))
    return out


# --- stores -----------------------------------------------------------------


class _Store:
    """Connection lifecycle shared by the three NATS stores."""

    def __init__(
        self,
        servers: Sequence[str] | str = DEFAULT_SERVERS,
        *,
        prefix: str = "omniq",
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls: bool | ssl.SSLContext | None = None,
        options: Mapping[str, Any] | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.prefix = _check_prefix(prefix)
        self._conn = _Connection(
            _server_list(servers),
            _connect_options(username, password, token, tls, options),
            request_timeout,
        )
        self._needs_setup = True
        self._name_things()

    def _name_things(self) -> None:
        """Names of this store's streams and buckets (they depend on the prefix)."""

    @_boundary
    async def open(self) -> None:
        await self._ready()

    async def close(self) -> None:
        await self._teardown(same_connection=self._conn.usable())
        await self._conn.close()
        self._needs_setup = True

    async def __aenter__(self: S) -> S:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _ready(self) -> NATS:
        """The open connection, connecting and creating streams/buckets when needed."""
        if self._conn.usable() and not self._needs_setup:
            return self._conn.nc
        async with self._conn.lock():
            if not self._conn.usable():
                await self._teardown(same_connection=False)
                await self._conn.connect()
                self._needs_setup = True
            if self._needs_setup:
                await self._run_setup()
        return self._conn.nc

    async def _run_setup(self) -> None:
        try:
            await self._setup()
        except nats.js.errors.ServiceUnavailableError:
            raise BackendUnavailable(
                f"JetStream is not enabled on {self._conn.url()}; start nats-server with -js"
            ) from None
        self._needs_setup = False

    async def _setup(self) -> None:
        raise NotImplementedError

    async def _teardown(self, same_connection: bool) -> None:
        return None


# --- queue: local lanes -------------------------------------------------------


@dataclass
class _Pull:
    """One outstanding pull request; at most one per lane, so its status is unambiguous."""

    size: int
    long: bool
    deadline: float  # loop time after which we stop waiting for its answer
    received: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Lane:
    """One (queue, priority) consumer and the messages pulled for it, not claimed yet."""

    queue: str
    priority: int
    consumer: str
    inbox: str
    buffer: deque[tuple[Msg, float]] = field(default_factory=deque)
    pull: _Pull | None = None
    empty_at: float = -math.inf
    hint: bool = True
    batch: int = 1
    pulled_at: float = -math.inf
    lost: bool = False
    sub: Subscription | None = None
    timer: asyncio.TimerHandle | None = None


class _Dispatcher:
    """Pulls task messages per lane into small buffers and wakes dequeuers.

    A lane the server just reported empty is skipped for FRESH seconds unless an
    enqueue woke it, so dequeues served from a buffer cost no round trip for
    the empty higher-priority lanes above it. Waiting dequeuers hold one long
    poll per lane: the server pushes new, retried and lease-expired messages.
    """

    def __init__(self, conn: _Connection, prefix: str, stream: str) -> None:
        self._conn = conn
        self._prefix = prefix
        self._stream = stream
        self._lanes: dict[tuple[str, int], _Lane] = {}
        self._levels: dict[str, set[int]] = {}
        self._levels_at: dict[str, float] = {}
        self._wakes: dict[str, Subscription] = {}
        self._create_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()

    def subject(self, queue: str, priority: int) -> str:
        return f"{self._prefix}.tasks.{_qtok(queue)}.{_ptok(priority)}"

    def wake_subject(self, queue: str) -> str:
        return f"{self._prefix}.wake.{_qtok(queue)}"

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def note(self, queue: str, priority: int) -> None:
        """Work may have arrived in this lane (an enqueue or release seen or made here)."""
        self._levels.setdefault(queue, set()).add(priority)
        lane = self._lanes.get((queue, priority))
        if lane is not None:
            lane.hint = True
        self._notify()

    async def lanes(self, queues: Sequence[str]) -> list[_Lane]:
        """The lanes to try, in order: queues as given, then higher priority first."""
        out: list[_Lane] = []
        for queue in queues:
            for priority in sorted(await self._levels_of(queue), reverse=True):
                out.append(await self._lane(queue, priority))
        return out

    async def _levels_of(self, queue: str) -> set[int]:
        if queue not in self._wakes:
            self._wakes[queue] = await self._conn.nc.subscribe(
                self.wake_subject(queue), cb=functools.partial(self._on_wake, queue)
            )
        if self._now() - self._levels_at.get(queue, -math.inf) > LEVEL_REFRESH:
            self._levels_at[queue] = self._now()
            info = await self._conn.js.stream_info(
                self._stream, subjects_filter=f"{self._prefix}.tasks.{_qtok(queue)}.*"
            )
            for subject in info.state.subjects or {}:
                priority = _parse_ptok(subject.rsplit(".", 1)[-1])
                if priority is not None:
                    self._levels.setdefault(queue, set()).add(priority)
        return self._levels.setdefault(queue, set())

    async def _on_wake(self, queue: str, msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            self.note(queue, int(msg.data))

    async def _lane(self, queue: str, priority: int) -> _Lane:
        lane = self._lanes.get((queue, priority))
        if lane is not None and not lane.lost:
            return lane
        async with self._create_lock:
            lane = self._lanes.get((queue, priority))
            if lane is None or lane.lost:
                lane = await self._create_lane(queue, priority, lane)
        return lane

    async def _create_lane(self, queue: str, priority: int, lane: _Lane | None) -> _Lane:
        consumer = f"{_qtok(queue)}-{_ptok(priority)}"
        config = api.ConsumerConfig(
            durable_name=consumer,
            filter_subject=self.subject(queue, priority),
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            # Scheduled and retried tasks wait as pending acks: never cap them.
            max_ack_pending=-1,
            max_deliver=-1,
            max_waiting=4096,
        )
        try:
            # Also updates the AckWait of a consumer made by an older omniq (30 s).
            await self._conn.js.add_consumer(self._stream, config)
        except nats.js.errors.BadRequestError:
            # A server that will not update it: use the consumer as it is.
            await self._conn.js.consumer_info(self._stream, consumer)
        if lane is None:
            lane = _Lane(queue, priority, consumer, self._conn.nc.new_inbox())
            lane.sub = await self._conn.nc.subscribe(
                lane.inbox, cb=functools.partial(self._on_message, lane)
            )
            self._lanes[(queue, priority)] = lane
        lane.lost = False
        lane.pull = None
        return lane

    async def _on_message(self, lane: _Lane, msg: Msg) -> None:
        status = _status(msg)
        if status is None:
            lane.buffer.append((msg, self._now()))
            self._arm_hold(lane)
            pull = lane.pull
            if pull is not None:
                pull.received += 1
                if pull.received >= pull.size:
                    self._end_pull(lane)
        elif status != "100":  # 100 = heartbeat
            if status in ("404", "408"):
                lane.empty_at = self._now()
            elif status == "503" or "Deleted" in str(msg.headers):
                lane.lost = True
            self._end_pull(lane)
        self._notify()

    def _end_pull(self, lane: _Lane) -> None:
        if lane.pull is not None:
            lane.pull.done.set()
            lane.pull = None

    def _live_pull(self, lane: _Lane) -> _Pull | None:
        pull = lane.pull
        if pull is not None and pull.deadline < self._now():
            # No answer at all: the consumer is gone (the server stays silent then)
            # or the connection dropped the request.
            lane.pull = None
            lane.lost = lane.lost or not pull.long
            return None
        return pull

    def _arm_hold(self, lane: _Lane) -> None:
        if lane.timer is None and lane.buffer:
            delay = max(0.0, lane.buffer[0][1] + HOLD - self._now())
            lane.timer = asyncio.get_running_loop().call_later(delay, self._give_back, lane)

    def _give_back(self, lane: _Lane) -> None:
        """Hand unclaimed messages back: a busy process must not sit on others' work."""
        lane.timer = None
        cutoff = self._now() - HOLD + 0.001
        stale: list[Msg] = []
        while lane.buffer and lane.buffer[0][1] <= cutoff:
            stale.append(lane.buffer.popleft()[0])
        if stale:
            lane.batch = max(1, lane.batch // 2)
            self._spawn(self._nak_all(stale))
        self._arm_hold(lane)

    async def _nak_all(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            await self._conn.nc.publish(msg.reply, b"-NAK")

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def next_message(self, lane: _Lane) -> tuple[Msg, float] | None:
        """A pulled message of this lane with its arrival time, pulling once if needed."""
        if not lane.buffer:
            await self._refill(lane)
        return lane.buffer.popleft() if lane.buffer else None

    async def _refill(self, lane: _Lane) -> None:
        pull = self._live_pull(lane)
        if pull is None:
            if not lane.hint and self._now() - lane.empty_at < FRESH:
                return
            pull = await self._pull(lane, size=self._batch(lane))
        elif pull.long:
            return  # an open long poll: the server has nothing for us right now
        # A quick pull is in flight (ours, or a concurrent dequeue's): wait for it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pull.done.wait(), max(0.0, pull.deadline - self._now()))

    def _batch(self, lane: _Lane) -> int:
        now = self._now()
        if now - lane.pulled_at < 0.05:  # drained the last batch quickly: take more
            lane.batch = min(MAX_BATCH, lane.batch * 2)
        lane.pulled_at = now
        return lane.batch

    async def _pull(self, lane: _Lane, size: int, expires: float = 0.0) -> _Pull:
        req: dict[str, Any] = {"batch": size}
        if expires > 0:
            req["expires"] = int(expires * 1e9)
        else:
            req["no_wait"] = True
        pull = _Pull(size, expires > 0, self._now() + expires + self._conn.timeout)
        lane.pull = pull
        lane.hint = False
        await self._conn.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{lane.consumer}",
            json.dumps(req).encode(),
            reply=lane.inbox,
        )
        return pull

    async def arm(self, lanes: Sequence[_Lane], budget: float) -> None:
        """Open a long poll on every idle lane, ending just before the caller's deadline."""
        expires = budget - POLL_MARGIN
        if expires < 0.05:
            return
        for lane in lanes:
            if not lane.buffer and self._live_pull(lane) is None:
                await self._pull(lane, size=1, expires=expires)

    async def close(self, same_connection: bool) -> None:
        leftovers: list[Msg] = []
        for lane in self._lanes.values():
            if lane.timer is not None:
                lane.timer.cancel()
            leftovers.extend(msg for msg, _ in lane.buffer)
            lane.buffer.clear()
        if not same_connection:
            return
        subs = [lane.sub for lane in self._lanes.values() if lane.sub] + list(self._wakes.values())
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self._nak_all(leftovers)
            await asyncio.gather(*self._background, return_exceptions=True)
            await self._conn.nc.flush(timeout=1)


# --- queue --------------------------------------------------------------------

# What identifies a task. Its state entry and its dispatch message both carry these
# headers, so claims, scans, unique-key checks and problem deliveries never need to
# decode a payload (which may be corrupt).
_META = (H_ID, H_QUEUE, H_PRIORITY, H_UNIQUE, H_UNIQUE_TTL)


def _meta_of(task: Task) -> dict[str, str]:
    meta = {H_ID: task.id, H_QUEUE: task.queue, H_PRIORITY: str(task.priority)}
    if task.unique_key is not None:
        meta[H_UNIQUE] = _unique_key(task.unique_key)
        if task.unique_ttl:
            meta[H_UNIQUE_TTL] = repr(float(task.unique_ttl))
    return meta


def _pick_meta(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: headers[k] for k in _META if headers.get(k)}


def _state_headers(
    meta: Mapping[str, str],
    state: str,
    attempts: int,
    *,
    ready: float = 0.0,
    lease: float = 0.0,
    claim: str | None = None,
) -> dict[str, str]:
    headers = {**meta, H_STATE: state, H_ATTEMPTS: str(attempts)}
    if ready:
        headers[H_READY] = repr(ready)
    if lease:
        headers[H_LEASE] = repr(lease)
    if claim:
        headers[H_CLAIM] = claim
    return headers


@dataclass
class _Receipt:
    """What a delivery needs to settle: the message's ack subject, the claim's revision,
    and the claim token that every write of this lease holder carries (so a write of
    ours whose reply was lost is recognised when it is sent again)."""

    reply: str
    key: str
    rev: int
    data: bytes
    attempts: int
    token: str
    meta: dict[str, str]
    acked: bool = False  # a finishing purge was sent (its reply may have been lost)


@dataclass(frozen=True)
class _Unsettled:
    """A claim whose reply never came: the server may have taken it for us."""

    reply: str
    key: str
    token: str


def _own_headers(entry: _Entry, state: str) -> dict[str, str]:
    out = {k: v for k, v in entry.headers.items() if k.startswith("Omniq-")}
    out[H_STATE] = state
    return out


def _task_id_of(entry: _Entry) -> str:
    # Entries of an older omniq lack the id header; their key is the id when it is plain.
    return entry.text(H_ID) or entry.key[2:]


def _holder(entry: _Entry) -> str:
    return entry.data.decode(errors="replace")


def _message_meta(lane: _Lane, msg: Msg) -> dict[str, str] | None:
    """The identity of the task a message dispatches, or None when it names no task."""
    headers = msg.headers or {}
    meta = _pick_meta(headers)
    if H_ID not in meta:
        # A message of an older omniq: the task's id was its Nats-Msg-Id.
        try:
            meta = _meta_of(decode_task(msg.data))
        except CorruptRecord:
            task_id = headers.get("Nats-Msg-Id")
            if not task_id:
                return None
            meta = {H_ID: task_id}
    # The lane knows where the message was published, whatever its payload says.
    meta.setdefault(H_QUEUE, lane.queue)
    meta.setdefault(H_PRIORITY, str(lane.priority))
    return meta


def _stat_of(entry: _Entry, now: float) -> str | None:
    if entry.state == WAITING:
        return "scheduled" if entry.number(H_READY) > now else "queued"
    if entry.state == RUNNING:
        return "running" if entry.number(H_LEASE) > now else "queued"
    if entry.state == FAILED:
        return "failed"
    return None


class NATSQueue(_Store):
    """Tasks in a JetStream work-queue stream; claims and leases arbitrated in a KV bucket."""

    def _name_things(self) -> None:
        self._stream = f"{self.prefix}_tasks"
        self._state = _Bucket(self._conn, f"{self.prefix}_queue")
        self._dispatcher: _Dispatcher | None = None
        self._unsettled: deque[_Unsettled] = deque()  # claims whose reply was lost

    async def _setup(self) -> None:
        js = self._conn.js
        await _ensure_stream(
            js,
            api.StreamConfig(
                name=self._stream,
                subjects=[f"{self.prefix}.tasks.>"],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                allow_direct=True,
            ),
        )
        await _ensure_bucket(js, self._state.name)
        if self._dispatcher is None:
            self._dispatcher = _Dispatcher(self._conn, self.prefix, self._stream)

    async def _teardown(self, same_connection: bool) -> None:
        if same_connection:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._hand_back_unsettled(), self._conn.timeout)
        self._unsettled.clear()
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            await dispatcher.close(same_connection)

    async def _hand_back_unsettled(self) -> None:
        """Closing with claims whose reply never came: release those the server took, so
        they run again now without an attempt counted against them."""
        while self._unsettled:
            lost = self._unsettled.popleft()
            entry = await self._state.get(lost.key)
            if entry is not None and entry.state == RUNNING and entry.text(H_CLAIM) == lost.token:
                r = _Receipt(lost.reply, lost.key, entry.rev, entry.data, entry.attempts,
                             lost.token, _pick_meta(entry.headers))
                waiting = _state_headers(r.meta, WAITING, max(0, r.attempts - 1), claim=r.token)
                await self._fenced(r, waiting)
            await self._conn.nc.publish(lost.reply, b"-NAK")

    async def _lanes(self) -> _Dispatcher:
        await self._ready()
        if not self._conn.nc.is_connected:
            raise BackendUnavailable(f"NATS at {self._conn.where} is unavailable: reconnecting")
        if self._dispatcher is None:
            self._dispatcher = _Dispatcher(self._conn, self.prefix, self._stream)
        return self._dispatcher

    # --- enqueue -------------------------------------------------------------

    @_boundary
    async def enqueue(self, task: Task) -> str:
        dispatcher = await self._lanes()
        key = _task_key(task.id)
        # State first: the worker that fetches the message, and an enqueuer checking
        # who holds a unique key, must find it.
        entry = await self._put_waiting(task, key)
        if entry.state != WAITING or entry.text(H_CLAIM) or not entry.text(H_ID):
            return task.id  # claimed at least once (or an older omniq's): left alone
        # Ours, or an earlier enqueue of this id whose reply was lost: finish its work.
        ukey = entry.text(H_UNIQUE)
        if ukey:
            holder = await self._hold_unique(ukey, task.id)
            if holder != task.id:
                await self._state.purge_at(key, entry.rev)
                return holder
        await self._dispatch(dispatcher, entry)
        return task.id

    async def _put_waiting(self, task: Task, key: str) -> _Entry:
        """Create the task's state; or the unfinished entry of its id, left as it is;
        a dead letter of its id is replaced (queued again from scratch)."""
        data = encode_task(task)
        eta = task.eta.timestamp() if task.eta else 0.0
        headers = _state_headers(_meta_of(task), WAITING, 0, ready=eta)
        last = 0
        for _ in range(5):
            rev = await self._state.put(key, data, headers, last=last)
            if rev is not None:
                return _Entry(key, rev, data, headers)
            entry = await self._state.get(key)
            if entry is not None and entry.state in (WAITING, RUNNING):
                return entry
            last = 0 if entry is None else entry.rev  # gone, dead, or being cancelled
        raise BackendError(f"task {task.id} is being changed by others; try again")

    async def _dispatch(self, dispatcher: _Dispatcher, entry: _Entry) -> None:
        """Publish the message that hands the task (this state revision) to a worker."""
        queue, priority = entry.queue, int(entry.number(H_PRIORITY))
        # The message id names this enqueue: a publish sent again (its reply was lost, or
        # the enqueue was repeated) is dropped within the stream's duplicate window, while
        # a dead letter queued again gets a new revision and so goes through. A copy after
        # the window is harmless: the state key, not the message, decides who runs it.
        headers = {
            **_pick_meta(entry.headers),
            H_REV: str(entry.rev),
            "Nats-Msg-Id": f"{entry.text(H_ID)}:{entry.rev}",
        }
        ready = entry.number(H_READY)
        if ready:
            headers[H_ETA] = repr(ready)
        subject = dispatcher.subject(queue, priority)
        await self._conn.js.publish(subject, entry.data, headers=headers)
        await self._conn.nc.publish(dispatcher.wake_subject(queue), b"%d" % priority)
        dispatcher.note(queue, priority)

    async def _hold_unique(self, ukey: str, task_id: str) -> str:
        """Take the unique key for `task_id`, or return the task holding it."""
        for _ in range(5):
            if await self._state.put(ukey, task_id.encode(), {}, last=0) is not None:
                return task_id
            entry = await self._state.get(ukey)
            if entry is None:
                continue  # freed meanwhile
            holder = _holder(entry)
            if holder == task_id and not entry.text(H_UNTIL):
                return task_id  # ours already (an enqueue sent again)
            if holder != task_id and await self._key_held(entry, holder):
                return holder
            # Free: its holder finished and its time ran out, or it ended without freeing
            # the key (a crash in between); or ours from a dead letter queued again.
            if await self._state.put(ukey, task_id.encode(), {}, last=entry.rev) is not None:
                return task_id
        raise BackendError(f"unique key {ukey!r} is contended; try again")

    async def _key_held(self, entry: _Entry, holder: str) -> bool:
        if entry.text(H_UNTIL):  # finished: held for its unique_ttl
            return entry.number(H_UNTIL) > time.time()
        return await self._unfinished(holder)

    async def _unfinished(self, task_id: str) -> bool:
        entry = await self._state.get(_task_key(task_id))
        return entry is not None and entry.state in (WAITING, RUNNING)

    async def _free_unique(self, ukey: str, task_id: str) -> None:
        if not ukey:
            return
        entry = await self._state.get(ukey)
        if entry is not None and _holder(entry) == task_id:
            await self._state.purge_at(ukey, entry.rev)

    async def _settle_unique(self, meta: Mapping[str, str]) -> None:
        """The task finished: hold its key for its unique_ttl more, or free it now."""
        ukey = meta.get(H_UNIQUE)
        ttl = float(meta.get(H_UNIQUE_TTL) or 0)
        if not ukey or not ttl:
            await self._free_unique(ukey or "", meta.get(H_ID, ""))
            return
        entry = await self._state.get(ukey)
        if entry is not None and _holder(entry) == meta.get(H_ID):
            until = {H_UNTIL: repr(time.time() + ttl)}
            await self._state.put(ukey, entry.data, until, last=entry.rev)

    # --- dequeue -------------------------------------------------------------

    @_boundary
    async def dequeue(
        self, queues: Sequence[str], lease: float, timeout: float
    ) -> Delivery | None:
        dispatcher = await self._lanes()
        refound = await self._refind(lease)
        if refound is not None:
            return refound
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            changed = dispatcher.changed  # taken first: a change during the pass wakes us
            lanes = await dispatcher.lanes(queues)
            delivery = await self._claim_first(dispatcher, lanes, lease)
            if delivery is not None:
                return delivery
            budget = deadline - loop.time()
            if budget <= 0:
                return None
            await dispatcher.arm(lanes, budget)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), budget)

    async def _refind(self, lease: float) -> Delivery | None:
        """A claim of ours whose reply never came: deliver it if the server took it (it
        must not sit out its lease and come back with an attempt that never ran), else
        hand its message back at once. Costs a read only after such a failure."""
        while self._unsettled:
            lost = self._unsettled.popleft()  # taken: concurrent dequeues share the list
            try:
                entry = await self._state.get(lost.key)
            except BaseException:
                self._unsettled.append(lost)  # ask again next time
                raise
            if entry is not None and entry.state == RUNNING and entry.text(H_CLAIM) == lost.token:
                r = _Receipt(lost.reply, lost.key, entry.rev, entry.data, entry.attempts,
                             lost.token, _pick_meta(entry.headers))
                # Renewed: the lease has been running while we did not know we held it.
                if await self._fenced(r, self._running(r, lease)):
                    await self._set_lease(r.reply, lease, -math.inf)
                    return self._delivery(r)
            await self._conn.nc.publish(lost.reply, b"-NAK")
        return None

    async def _claim_first(
        self, dispatcher: _Dispatcher, lanes: Sequence[_Lane], lease: float
    ) -> Delivery | None:
        # A message that cannot be claimed now (held by a live lease, not due, already
        # settled) is parked server-side and the next one is tried: one task redelivered
        # over and over never blocks its lane.
        for lane in lanes:
            while (item := await dispatcher.next_message(lane)) is not None:
                delivery = await self._claim(lane, item[0], item[1], lease)
                if delivery is not None:
                    return delivery
        return None

    async def _claim(self, lane: _Lane, msg: Msg, arrived: float, lease: float) -> Delivery | None:
        headers = msg.headers or {}
        now = time.time()
        eta = float(headers.get(H_ETA) or 0)
        if eta > now + ETA_SLACK:
            # Fetched early: park it server-side until its ETA; no attempt is counted.
            await self._conn.nc.publish(msg.reply, _nak_payload(eta - now))
            return None
        meta = _message_meta(lane, msg)
        if meta is None:
            # No id anywhere: not written by omniq, so no task state waits for it.
            log.error("dropping a message on %s that is not an omniq task", msg.subject)
            await self._conn.nc.publish(msg.reply, b"+TERM")
            return None
        # A client-chosen claim token: if the reply of the claim is lost, the next
        # dequeue finds the claim by it (see _refind).
        r = _Receipt(msg.reply, _task_key(meta[H_ID]), 0, msg.data, 0, uuid.uuid4().hex, meta)
        try:
            claimed = await self._claim_fresh(r, headers, now + lease)
            if not claimed:
                claimed = await self._claim_again(r, lease)
        except BaseException:
            self._unsettled.append(_Unsettled(r.reply, r.key, r.token))
            raise
        if not claimed:
            return None
        await self._set_lease(msg.reply, lease, arrived)
        return self._delivery(r)

    def _delivery(self, r: _Receipt) -> Delivery:
        task, problem = decode_task_or_placeholder(
            r.data, r.meta[H_ID], r.meta.get(H_QUEUE) or "default"
        )
        # (The worker records it failed and logs that one line.)
        return Delivery(task=task, attempt=r.attempts, receipt=r, problem=problem)

    def _running(self, r: _Receipt, lease: float, attempts: int | None = None) -> dict[str, str]:
        attempts = r.attempts if attempts is None else attempts
        until = time.time() + lease
        return _state_headers(r.meta, RUNNING, attempts, lease=until, claim=r.token)

    async def _claim_fresh(self, r: _Receipt, headers: Mapping[str, str], until: float) -> bool:
        """First delivery: the key is still at the revision the enqueuer wrote. One write."""
        rev0 = int(headers.get(H_REV) or 0)
        if not rev0:
            return False
        state = _state_headers(r.meta, RUNNING, 1, lease=until, claim=r.token)
        rev = await self._state.put(r.key, r.data, state, last=rev0)
        if rev is None:
            return False
        r.rev, r.attempts = rev, 1
        return True

    async def _claim_again(self, r: _Receipt, lease: float) -> bool:
        """Redelivery (lease expired, retry due, released): read the state, then claim."""
        for _ in range(3):
            entry = await self._state.get(r.key)
            if entry is None or entry.state not in (WAITING, RUNNING):
                await self._conn.nc.publish(r.reply, b"+ACK")  # cancelled, purged or done
                return False
            now = time.time()
            busy = entry.number(H_LEASE if entry.state == RUNNING else H_READY) - now
            if busy > ETA_SLACK:
                # Held by a live lease or not due yet: re-park the message until then.
                await self._conn.nc.publish(r.reply, _nak_payload(busy))
                return False
            # The stored entry is the truth (an operator may have rewritten it).
            r.meta = {**r.meta, **_pick_meta(entry.headers)}
            r.data = entry.data
            state = self._running(r, lease, entry.attempts + 1)
            rev = await self._state.put(r.key, entry.data, state, last=entry.rev)
            if rev is not None:
                r.rev, r.attempts = rev, entry.attempts + 1
                return True
        return False

    async def _set_lease(self, reply: str, lease: float, arrived: float) -> None:
        """Make the server redeliver after `lease` s, unless AckWait already means that."""
        age = asyncio.get_running_loop().time() - arrived
        if abs(lease - ACK_WAIT) <= 1.0 and age < 1.0:
            return
        await self._conn.nc.publish(reply, _nak_payload(lease))

    # --- settle ------------------------------------------------------------------

    async def _fenced(self, r: _Receipt, headers: dict[str, str]) -> bool:
        """Write the lease holder's next state while it still holds the lease (a
        compare-and-set on the claim's revision). When that fails, an entry carrying
        our claim token can only be a write of ours whose reply was lost: adopt it."""
        for _ in range(3):
            rev = await self._state.put(r.key, r.data, headers, last=r.rev)
            if rev is not None:
                r.rev = rev
                return True
            entry = await self._state.get(r.key)
            if entry is None or entry.text(H_CLAIM) != r.token:
                return False  # the lease was lost: whoever holds the task now settles it
            r.rev = entry.rev
            if entry.state == headers[H_STATE] != RUNNING:
                return True  # this very write landed before
        return False

    async def _finish(self, r: _Receipt) -> bool:
        """Remove a finished task's state while this lease holds it: one fenced purge."""
        for _ in range(3):
            sent_before, r.acked = r.acked, True
            if await self._state.purge_at(r.key, r.rev):
                return True
            entry = await self._state.get(r.key)
            if entry is None:
                # Our earlier purge whose reply was lost (if we sent one); else another
                # holder finished it after our lease ran out.
                return sent_before
            if entry.text(H_CLAIM) != r.token:
                return False
            r.rev = entry.rev  # an extend of ours landed unseen: still ours
        return False

    @_boundary
    async def ack(self, delivery: Delivery, *, failed: bool = False) -> bool:
        await self._ready()
        r = _receipt(delivery)
        # State before the message: if we die in between, the redelivery finds no
        # state (or a dead letter) and is dropped.
        if failed:
            done = await self._fenced(r, _state_headers(r.meta, FAILED, r.attempts, claim=r.token))
        else:
            done = await self._finish(r)
        if not done:
            return False
        await self._settle_unique(r.meta)
        await self._conn.nc.publish(r.reply, b"+ACK")
        return True

    @_boundary
    async def retry(self, delivery: Delivery, delay: float) -> bool:
        await self._ready()
        r = _receipt(delivery)
        ready = time.time() + max(0.0, delay)
        headers = _state_headers(r.meta, WAITING, r.attempts, ready=ready, claim=r.token)
        if not await self._fenced(r, headers):
            return False  # the lease was lost: whoever holds the task now settles it
        await self._conn.nc.publish(r.reply, _nak_payload(delay))
        return True

    @_boundary
    async def release(self, delivery: Delivery) -> None:
        dispatcher = await self._lanes()
        r = _receipt(delivery)
        headers = _state_headers(r.meta, WAITING, max(0, r.attempts - 1), claim=r.token)
        if not await self._fenced(r, headers):
            return
        await self._conn.nc.publish(r.reply, b"-NAK")
        queue, priority = r.meta.get(H_QUEUE) or "default", int(r.meta.get(H_PRIORITY) or 0)
        await self._conn.nc.publish(dispatcher.wake_subject(queue), b"%d" % priority)
        dispatcher.note(queue, priority)

    @_boundary
    async def extend(self, delivery: Delivery, lease: float) -> bool:
        await self._ready()
        r = _receipt(delivery)
        if not await self._fenced(r, self._running(r, lease)):
            return False  # another delivery claimed it, or it was settled
        if abs(lease - ACK_WAIT) <= 1.0:
            await self._conn.nc.publish(r.reply, b"+WPI")
        else:
            await self._conn.nc.publish(r.reply, _nak_payload(lease))
        return True

    # --- inspection and maintenance ---------------------------------------------

    @_boundary
    async def cancel(self, task_id: str) -> bool:
        await self._ready()
        key = _task_key(task_id)
        entry = await self._state.get(key)
        if entry is None or entry.state != WAITING:
            return False
        # The message stays in the stream; the worker that fetches it finds no state and drops it.
        rev = await self._state.put(key, b"", _own_headers(entry, CANCELLED), last=entry.rev)
        if rev is None:
            return False  # claimed meanwhile
        await self._state.purge_at(key, rev)
        await self._free_unique(entry.text(H_UNIQUE), task_id)
        return True

    @_boundary
    async def get_task(self, task_id: str) -> Task | None:
        await self._ready()
        entry = await self._state.get(_task_key(task_id))
        if entry is None or entry.state not in (WAITING, RUNNING, FAILED):
            return None
        task, _ = decode_task_or_placeholder(entry.data, task_id, entry.queue or "default")
        return task

    @_boundary
    async def stats(self) -> list[QueueStats]:
        await self._ready()
        now = time.time()
        counts: dict[str, Counter[str]] = {}
        async for entry in self._state.scan("t.*", headers_only=True):
            kind = _stat_of(entry, now)
            if kind is not None:
                counts.setdefault(entry.queue, Counter())[kind] += 1
        return [
            QueueStats(queue=name, queued=c["queued"], scheduled=c["scheduled"],
                       running=c["running"], failed=c["failed"])
            for name, c in sorted(counts.items())
        ]

    @_boundary
    async def purge(self, queue: str | None = None) -> int:
        await self._ready()
        floor = (await self._conn.js.stream_info(self._stream)).state.last_seq
        entries = [
            e async for e in self._state.scan("t.*", headers_only=True)
            if queue is None or e.queue == queue
        ]
        outcomes = await _in_chunks(entries, self._drop)
        if floor and all(o is not None for o in outcomes):
            # Nothing of these queues is running: drop their messages too, instead of
            # leaving them for workers to skip. Newer messages (above floor) stay.
            subject = f"{self.prefix}.tasks.{_qtok(queue)}.*" if queue else f"{self.prefix}.tasks.>"
            await _purge(self._conn, self._stream, subject, below=floor + 1)
        return sum(1 for o in outcomes if o)

    async def _drop(self, entry: _Entry) -> bool | None:
        """Drop one waiting/dead task: True if counted, False if silently, None if running."""
        if entry.state == RUNNING:
            return None
        rev: int | None = entry.rev
        if entry.state == WAITING:
            rev = await self._state.put(
                entry.key, b"", _own_headers(entry, CANCELLED), last=entry.rev
            )
            if rev is None:
                return None  # claimed meanwhile
        if not await self._state.purge_at(entry.key, rev or entry.rev):
            return None if entry.state == FAILED else False  # queued again meanwhile
        await self._free_unique(entry.text(H_UNIQUE), _task_id_of(entry))
        return entry.state in (WAITING, FAILED)

    # --- workers -------------------------------------------------------------------

    @_boundary
    async def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        await self._ready()
        until = {H_UNTIL: repr(time.time() + ttl)}
        await self._state.put(_worker_key(info.worker_id), encode_worker(info), until)

    @_boundary
    async def unregister_worker(self, worker_id: str) -> None:
        await self._ready()
        await self._state.purge(_worker_key(worker_id))

    @_boundary
    async def workers(self) -> list[WorkerInfo]:
        await self._ready()
        now = time.time()
        live: list[WorkerInfo] = []
        dead: list[str] = []
        async for entry in self._state.scan("w.*", headers_only=False):
            if entry.number(H_UNTIL) > now:
                live.append(decode_worker(entry.data))
            else:
                dead.append(entry.key)
        await _in_chunks(dead, self._state.purge)
        return sorted(live, key=lambda w: w.worker_id)


def _receipt(delivery: Delivery) -> _Receipt:
    if not isinstance(delivery.receipt, _Receipt):
        raise BackendError(f"delivery of task {delivery.task_id} was not made by a NATS queue")
    return delivery.receipt


# --- results --------------------------------------------------------------------


def _expired(entry: _Entry) -> bool:
    """Whether a stored result has expired, from its header (no decoding)."""
    return bool(entry.text(H_EXPIRES)) and entry.number(H_EXPIRES) <= time.time()


def _result_of(data: bytes) -> TaskResult | None:
    result = decode_result(data)
    return None if result.is_expired() else result


class NATSResultStorage(_Store):
    """Results in a KV bucket; `wait` is pushed by a subscription on the key's subject."""

    def _name_things(self) -> None:
        self._bucket = _Bucket(self._conn, f"{self.prefix}_results")

    async def _setup(self) -> None:
        await _ensure_bucket(self._conn.js, self._bucket.name)

    @_boundary
    async def store(self, result: TaskResult) -> bool:
        await self._ready()
        headers = {H_FINISHED: repr(result.finished_at.timestamp())}
        if result.expires_at is not None:
            headers[H_EXPIRES] = repr(result.expires_at.timestamp())
        key, data = _tok(result.task_id), encode_result(result)
        last = 0  # a KV create: the first final outcome wins
        for _ in range(5):
            if await self._bucket.put(key, data, headers, last=last) is not None:
                return True
            entry = await self._bucket.get(key)
            if entry is None:
                last = 0  # deleted meanwhile
            elif entry.data == data:
                # This very result: our earlier write whose reply was lost (the bytes hold
                # the worker id and finish time to the microsecond, so no one else's).
                return True
            elif _expired(entry):
                last = entry.rev  # an expired result does not block a new one
            else:
                return False
        raise BackendError(f"the result of task {result.task_id} is contended; try again")

    @_boundary
    async def get(self, task_id: str) -> TaskResult | None:
        await self._ready()
        return await self._get(task_id)

    async def _get(self, task_id: str) -> TaskResult | None:
        entry = await self._bucket.get(_tok(task_id))
        return None if entry is None else _result_of(entry.data)

    @_boundary
    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        nc = await self._ready()
        # A core subscription on the key's subject sees every write, like a KV watch,
        # without creating a consumer per waiter. Subscribing before the first read
        # closes the race with a store in between.
        sub = await nc.subscribe(self._bucket.subject(_tok(task_id)))
        try:
            return await self._await(sub, task_id, timeout)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _await(
        self, sub: Subscription, task_id: str, timeout: float | None
    ) -> TaskResult | None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            result = await self._get(task_id)
            if result is not None:
                return result
            pause = RESULT_RECHECK
            if deadline is not None:
                pause = min(pause, deadline - loop.time())
            if pause <= 0:
                return None
            try:
                msg = await sub.next_msg(timeout=pause)
            except nats.errors.TimeoutError:
                continue
            if msg.data and not (msg.headers or {}).get("KV-Operation"):
                result = _result_of(msg.data)
                if result is not None:
                    return result

    @_boundary
    async def delete(self, task_id: str) -> bool:
        await self._ready()
        return await self._bucket.purge(_tok(task_id))

    @_boundary
    async def cleanup(self, now: datetime, finished_before: datetime | None = None) -> int:
        await self._ready()
        cutoff = now.timestamp()
        oldest = -math.inf if finished_before is None else finished_before.timestamp()

        def doomed(e: _Entry) -> bool:
            expired = bool(e.text(H_EXPIRES)) and e.number(H_EXPIRES) <= cutoff
            return expired or (bool(e.text(H_FINISHED)) and e.number(H_FINISHED) < oldest)

        keys = [e.key async for e in self._bucket.scan(">", headers_only=True) if doomed(e)]
        return sum(await _in_chunks(keys, self._bucket.purge))


# --- events ---------------------------------------------------------------------


_CURSORS = NumberedCursors(16, "NATS")
_cursor = _CURSORS.format
_seq_of = _CURSORS.parse


class NATSEventStorage(_Store):
    """Events in a stream, one subject per task; the cursor is the stream sequence."""

    def _name_things(self) -> None:
        self._stream = f"{self.prefix}_events"
        self._all = f"{self.prefix}.events.>"

    def _subject(self, task_id: str) -> str:
        return f"{self.prefix}.events.{_tok(task_id)}"

    async def _setup(self) -> None:
        config = api.StreamConfig(
            name=self._stream,
            subjects=[self._all],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            allow_direct=True,
            duplicate_window=EVENT_DEDUPE_WINDOW,
        )
        await _ensure_stream(self._conn.js, config)
        await _widen_dedupe_window(self._conn.js, self._stream, EVENT_DEDUPE_WINDOW)

    def _headers(self, event: TaskEvent) -> dict[str, str]:
        # The server drops a second message with the same Nats-Msg-Id that arrives within
        # the stream's duplicate window (EVENT_DEDUPE_WINDOW), answering it like the first.
        return {H_TS: repr(event.timestamp.timestamp()), "Nats-Msg-Id": event.id}

    @_boundary
    async def append(self, event: TaskEvent) -> None:
        await self._ready()
        await self._conn.js.publish(
            self._subject(event.task_id), encode_event(event), headers=self._headers(event)
        )

    @_boundary
    async def append_many(self, events: Sequence[TaskEvent]) -> None:
        await self._ready()
        js = self._conn.js
        # Pipelined: published in order on one connection, acknowledgements awaited together.
        futures = [
            await js.publish_async(
                self._subject(e.task_id), encode_event(e), headers=self._headers(e)
            )
            for e in events
        ]
        await asyncio.wait_for(asyncio.gather(*futures), self._conn.timeout)

    @_boundary
    async def get(self, task_id: str) -> list[TaskEvent]:
        nc = await self._ready()
        subject = self._subject(task_id)
        out: list[TaskEvent] = []
        seq = 1
        while True:
            msg = await nc.request(
                f"$JS.API.DIRECT.GET.{self._stream}",
                json.dumps({"seq": seq, "next_by_subj": subject}).encode(),
                timeout=self._conn.timeout,
            )
            status = _status(msg)
            if status == "404":
                return out
            if status:
                nats.js.errors.APIError.from_msg(msg)
            out.append(decode_event(msg.data))
            seq = int((msg.headers or {})["Nats-Sequence"]) + 1

    @_boundary
    async def read(self, after: str | None, limit: int) -> list[tuple[str, TaskEvent]]:
        await self._ready()
        if limit <= 0:
            return []
        rows: list[tuple[str, TaskEvent]] = []
        async for msg in _scan(
            self._conn, self._stream, self._all, start_seq=_seq_of(after) + 1, limit=limit
        ):
            rows.append((_cursor(msg.metadata.sequence.stream), decode_event(msg.data)))
        return rows

    @_boundary
    async def latest(self, limit: int, before: str | None = None) -> list[tuple[str, TaskEvent]]:
        await self._ready()
        if limit <= 0:
            return []
        state = (await self._conn.js.stream_info(self._stream)).state
        first, upper = max(int(state.first_seq), 1), int(state.last_seq)
        if before is not None:
            upper = min(upper, _seq_of(before) - 1)
        rows: list[tuple[str, TaskEvent]] = []
        window = limit
        while len(rows) < limit and upper >= first:
            start = max(first, upper - window + 1)
            found = await self._between(start, upper)
            rows = found[len(rows) - limit :] + rows
            upper = start - 1
            window *= 2  # deleted sequences left gaps: widen rather than crawl back
        return rows

    async def _between(self, start: int, end: int) -> list[tuple[str, TaskEvent]]:
        """The events with stream sequence in [start, end], oldest first."""
        rows: list[tuple[str, TaskEvent]] = []
        async for msg in _scan(
            self._conn, self._stream, self._all, start_seq=start, limit=end - start + 1
        ):
            seq = msg.metadata.sequence.stream
            if seq <= end:  # later ones were appended after we looked
                rows.append((_cursor(seq), decode_event(msg.data)))
        return rows

    async def _last_seq(self) -> int:
        return int((await self._conn.js.stream_info(self._stream)).state.last_seq)

    @_boundary
    async def last_cursor(self) -> str | None:
        await self._ready()
        last = await self._last_seq()
        return _cursor(last) if last else None

    @_boundary
    async def wait_new(self, after: str | None, timeout: float) -> None:
        nc = await self._ready()
        # Subscribe first, then look: an append in between still wakes us.
        sub = await nc.subscribe(self._all, max_msgs=1)
        try:
            if await self._last_seq() > _seq_of(after):
                return
            with contextlib.suppress(nats.errors.TimeoutError):
                await sub.next_msg(timeout=max(0.001, timeout))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    @_boundary
    async def cleanup(self, before: datetime) -> int:
        await self._ready()
        cutoff = before.timestamp()
        seqs: list[int] = []
        old: list[int] = []
        async for msg in _scan(self._conn, self._stream, self._all, headers_only=True):
            seq = msg.metadata.sequence.stream
            seqs.append(seq)
            stamp = (msg.headers or {}).get(H_TS)
            ts = float(stamp) if stamp else msg.metadata.timestamp.timestamp()
            if ts < cutoff:
                old.append(seq)
        return await self._remove(seqs, old)

    async def _remove(self, seqs: list[int], old: list[int]) -> int:
        """Purge the old head of the stream in one call; delete stragglers one by one."""
        head = 0
        while head < len(old) and old[head] == seqs[head]:
            head += 1
        if head:
            await _purge(self._conn, self._stream, None, below=old[head - 1] + 1)

        async def delete(seq: int) -> None:
            await _api(self._conn, f"$JS.API.STREAM.MSG.DELETE.{self._stream}", {"seq": seq})

        await _in_chunks(old[head:], delete)
        return len(old)


# --- factory --------------------------------------------------------------------

_SETTINGS = {"servers", "url", "host", "port", "username", "password", "prefix", "tls", "options"}


def _servers_from(settings: Mapping[str, Any]) -> Sequence[str] | str:
    if "servers" in settings:
        return settings["servers"]
    if settings.get("url"):
        return str(settings["url"])
    if settings.get("host") or settings.get("port"):
        return f"nats://{settings.get('host') or 'localhost'}:{settings.get('port') or 4222}"
    return DEFAULT_SERVERS


def create(role: Role, settings: Mapping[str, Any]) -> Any:
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise ConfigError(
            f"the nats backend does not use {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(_SETTINGS))}"
        )
    options = dict(settings.get("options") or {})
    kwargs: dict[str, Any] = {
        "prefix": settings.get("prefix", "omniq"),
        "username": settings.get("username"),
        "password": settings.get("password"),
        "token": options.pop("token", None),
        "tls": settings.get("tls"),
        "options": options,
    }
    cls = {"queue": NATSQueue, "results": NATSResultStorage, "events": NATSEventStorage}[role]
    return cls(_servers_from(settings), **kwargs)


__all__ = ["NATSEventStorage", "NATSQueue", "NATSResultStorage", "create"]
