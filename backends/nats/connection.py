"""The NATS connection of a Backend (one per process and event loop), the requests
multiplexed on it, the JetStream primitives the stores are built from, and driver
errors translated into omniq's."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from omniq.backend import Bound
from omniq.backend import boundary as _boundary
from omniq.errors import BackendError, BackendUnavailable, ConfigError, OmniQError, redact

log = logging.getLogger("omniq.backends.nats")
R = TypeVar("R")
S = TypeVar("S")
P = ParamSpec("P")
Method = Callable[Concatenate[S, P], Coroutine[Any, Any, R]]


def boundary(method: Method[S, P, R]) -> Method[S, P, R]:
    """`omniq.backend.boundary`, typed as the coroutine function it returns, so that the
    decorated methods still satisfy the role Protocols (whose methods are `async def`)."""
    return cast("Method[S, P, R]", _boundary(method))

DEFAULT_SERVERS = ("nats://localhost:4222",)
CONNECT_TIMEOUT = 2.0  # per attempt; nats-py tries each server twice on open
OPEN_BUDGET = 6.0  # a failed open gives up after this, whatever nats-py would do
# Between reconnect attempts to one server once a connection was up. Short: a write while
# reconnecting fails at once (nothing is buffered, see Connection), so the time spent
# reconnecting is time every call fails; an attempt on a server that is down costs a
# refused connect.
RECONNECT_WAIT = 0.2
REQUEST_TIMEOUT = 5.0
SCAN_BATCH = 256
SCAN_IDLE = 30.0
CHUNK = 32  # concurrent requests in bulk maintenance (purge, cleanup)
# Acks and NAKs of task messages wait this long for the next request to go out with: each
# write to the socket is a system call that wakes the server (measured ~110 us of client
# CPU each under load, the largest single cost of a drain), and a few ms do not matter
# to an ack.
DEFER = 0.002

_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
_WRONG_LAST_SEQ = (10071, 10164)
_SUBJECTS_OVERLAP = 10065  # another stream already takes these subjects
_STREAM_IN_USE = 10058
_KV_DELETED = ("DEL", "PURGE")


# --- names ----------------------------------------------------------------


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ConfigError(
            f"NATS prefix {prefix!r} is not valid: stream and bucket names allow only "
            "letters, digits, '_' and '-' (1-64 characters)"
        )
    return prefix


def tok(text: str) -> str:
    """Free text as one subject token / KV key: itself when plain, else '=' + a hash."""
    if _PLAIN_TOKEN.fullmatch(text):
        return text
    return "=" + hashlib.sha256(text.encode()).hexdigest()[:40]


def status_of(msg: Msg) -> str | None:
    return msg.headers.get("Status") if msg.headers else None


# --- times: microseconds since the epoch, exact (no float on the way) -------------------

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def us_of(when: datetime) -> int:
    return (when - EPOCH) // _US


def at_us(us: int) -> datetime:
    return EPOCH + us * _US


def rfc3339(us: int) -> str:
    return f"{at_us(us):%Y-%m-%dT%H:%M:%S.%fZ}"


def stored_ns(msg: Msg) -> int:
    """When the server stored a message a consumer delivered, in nanoseconds (from its
    reply subject; nats-py's metadata rounds it through a float)."""
    tokens = (msg.reply or "").split(".")
    return int(tokens[7] if len(tokens) == 9 else tokens[Msg.Ack.Timestamp])


# --- errors ---------------------------------------------------------------

_UNAVAILABLE = (
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,  # a publish while reconnecting (nothing buffered)
    nats.errors.AuthorizationError,
    nats.errors.ConnectionDrainingError,
    OSError,
)


def translate(exc: BaseException, where: str, timeout: float) -> OmniQError | None:
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
        return BackendUnavailable(f"NATS at {where} is unavailable: {describe(exc)}")
    if isinstance(exc, nats.errors.Error):
        return BackendError(f"NATS error at {where}: {describe(exc)}")
    return None


def stream_gone(exc: BaseException) -> bool:
    """An admin deleted a stream or bucket: recreate it on next use."""
    return isinstance(exc, nats.js.errors.NoStreamResponseError | nats.js.errors.NotFoundError)


def _is_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or "Authorization" in str(exc)


def describe(exc: BaseException) -> str:
    text = str(exc).strip().removeprefix("nats: ").strip("'")
    return redact(text) if text else type(exc).__name__


def _api_error(data: Mapping[str, Any]) -> None:
    """Raise the reply's JetStream error (as nats-py's APIError family), if any."""
    if "error" in data:
        nats.js.errors.APIError.from_error(data["error"])


# --- settings -----------------------------------------------------------------


def connect_options(
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


def server_list(servers: Sequence[str] | str) -> list[str]:
    found = [servers] if isinstance(servers, str) else list(servers)
    found = [s.strip() for s in found if s and s.strip()]
    if not found:
        raise ConfigError("NATS needs at least one server URL, e.g. nats://localhost:4222")
    return found


# --- one connection per process and loop ------------------------------------------


@dataclass(eq=False)
class Link:
    """A connection of one process and event loop, and what lives on it: the replies
    awaited on it, which roles' streams were checked through it, the queue's lanes."""

    nc: NATS | None = None
    js: JetStreamContext | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: set[str] = field(default_factory=set)  # roles whose streams/buckets exist
    extras: dict[str, Any] = field(default_factory=dict)  # role state bound to this link
    replies: dict[str, asyncio.Future[Msg]] = field(default_factory=dict)
    inbox: str = ""
    counter: int = 0
    # Result waiters re-read their key after a reconnect: a write in the gap was
    # not pushed to them.
    wakers: set[asyncio.Future[Any]] = field(default_factory=set)
    closing: asyncio.Future[None] | None = None
    deferred: list[tuple[str, bytes]] = field(default_factory=list)  # see publish_soon
    flushing: asyncio.TimerHandle | None = None

    def usable(self) -> bool:
        return self.nc is not None and not self.nc.is_closed


class Connection:
    """The NATS connection of one Backend: bounded first connect, endless reconnects once
    up, made again in a forked child or under another event loop (omniq.backend.Bound).

    Nothing is ever sent behind the caller's back. nats-py buffers publishes made while
    it reconnects (2 MB by default) and sends them once reconnected; a write that had
    already been reported failed would then land late, ahead of writes made since (an
    event written back in order by the event buffer, say). `pending_size=0` makes such a
    publish fail at once instead (nats-py raises OutboundBufferLimitError, our
    BackendUnavailable); requests in flight when the connection drops fail at once too,
    instead of waiting out their timeout; and a connection that drops with bytes still
    unsent in nats-py's buffer is closed rather than left to send them on reconnect.
    """

    def __init__(
        self, servers: list[str], options: dict[str, Any], timeout: float = REQUEST_TIMEOUT
    ) -> None:
        self.servers = servers
        self.timeout = timeout  # per request: a reply later than this counts as lost
        self.where = redact(", ".join(servers))
        self._options = options
        self._bound: Bound[Link] = Bound(Link, _abandon)
        self._last_error: BaseException | None = None
        self._errors: list[BaseException] = []  # every error reported while connecting

    # --- the current link ------------------------------------------------------------

    def link(self) -> Link:
        """This process's and loop's link (maybe not connected yet)."""
        return self._bound.get()

    def current(self) -> Link | None:
        return self._bound.current()

    @property
    def nc(self) -> NATS:
        link = self._bound.current()
        if link is None or link.nc is None:
            raise BackendUnavailable(f"NATS connection to {self.where} is not open")
        return link.nc

    @property
    def js(self) -> JetStreamContext:
        link = self._bound.current()
        if link is None or link.js is None:
            raise BackendUnavailable(f"NATS connection to {self.where} is not open")
        return link.js

    def url(self) -> str:
        """The server actually connected to, without credentials."""
        link = self._bound.current()
        u = link.nc.connected_url if link is not None and link.nc is not None else None
        if u is None:
            return self.where
        return f"{u.scheme}://{u.hostname}:{u.port}"

    async def open(self) -> Link:
        """The connected link, connecting (once, for all concurrent callers) if needed."""
        link = self._bound.get()
        if link.usable():
            return link
        async with link.lock:
            if not link.usable():
                await self._connect(link)
        return link

    async def _connect(self, link: Link) -> None:
        if link.nc is not None:  # closed since (a drop with unsent bytes): start afresh
            link.ready.clear()
            link.extras.clear()
        nc = NATS()
        self._last_error = None
        self._errors = []
        try:
            await asyncio.wait_for(nc.connect(**self._connect_args(link)), OPEN_BUDGET)
            # Replies of our requests, multiplexed on one subscription.
            link.inbox = nc.new_inbox() + "."
            await nc.subscribe(link.inbox + "*", cb=bound_cb(_on_reply, link))
        except Exception as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 1.0)
            raise BackendUnavailable(self._refusal(exc)) from None
        # Bounded while opening; once up, ride out server restarts in the background.
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = RECONNECT_WAIT
        link.nc, link.js = nc, nc.jetstream(timeout=self.timeout)

    def _connect_args(self, link: Link) -> dict[str, Any]:
        return {
            "servers": self.servers,
            "name": "omniq",
            "connect_timeout": CONNECT_TIMEOUT,
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.1,
            "pending_size": 0,  # see the class docstring
            "error_cb": self._on_error,
            "disconnected_cb": bound_cb(self._on_disconnect, link),
            "reconnected_cb": bound_cb(self._on_reconnect, link),
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
        return f"cannot connect to NATS at {self.where}: {describe(reason)}"

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        self._errors.append(exc)
        log.debug("NATS %s: %s", self.where, describe(exc))

    async def _on_disconnect(self, link: Link) -> None:
        nc = link.nc
        if nc is None or nc.is_closed:
            return
        # Debug only: the worker reports an outage once.
        log.debug("lost the connection to NATS at %s; reconnecting", self.where)
        lost = BackendUnavailable(f"NATS at {self.where} is unavailable: connection lost")
        replies, link.replies = link.replies, {}
        for future in replies.values():
            if not future.done():
                future.set_exception(lost)
                future.exception()  # its awaiter, if any, still gets it; no one else logs it
        if nc.pending_data_size:
            # Written by us before the drop but not sent yet: nats-py would send it on
            # reconnect, after its caller was told it failed. Closing drops it; the next
            # call connects afresh, and result waiters look again. (Not awaited here: this
            # runs in nats-py's reconnect task, which close() cancels.)
            link.closing = asyncio.ensure_future(nc.close())
            await self._on_reconnect(link)

    async def _on_reconnect(self, link: Link) -> None:
        log.debug("reconnected to NATS at %s", self.url())
        wakers, link.wakers = link.wakers, set()
        for future in wakers:
            if not future.done():
                future.set_result(None)

    async def close(self) -> None:
        await self.flush_soon()
        link = self._bound.current()
        nc = link.nc if link is not None else None
        self._bound.drop()
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2.0)

    # --- requests -----------------------------------------------------------------------

    def _live(self) -> tuple[Link, NATS]:
        link = self._bound.current()
        nc = link.nc if link is not None else None
        if link is None or nc is None or nc.is_closed:
            raise BackendUnavailable(f"NATS connection to {self.where} is not open")
        if not nc.is_connected:
            raise BackendUnavailable(f"NATS at {self.where} is unavailable: reconnecting")
        return link, nc

    async def send(
        self, subject: str, payload: bytes, headers: Mapping[str, str] | None = None
    ) -> asyncio.Future[Msg]:
        """Publish a request now; the future resolves with its reply. Requests sent one
        after another without awaiting go out in one write to the socket."""
        link, nc = self._live()
        if link.deferred:
            await self._flush(link)
        link.counter += 1
        token = str(link.counter)
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        link.replies[token] = future
        try:
            await nc.publish(subject, payload, reply=link.inbox + token,
                             headers=dict(headers) if headers else None)
        except BaseException:
            link.replies.pop(token, None)
            raise
        return future

    async def replies(self, futures: Sequence[asyncio.Future[Msg]]) -> list[Msg]:
        """The replies of requests sent together, awaited together under one timeout
        (a timer that fails the late ones: see `within` on asyncio.wait_for)."""
        if not futures:
            return []
        timer = asyncio.get_running_loop().call_later(self.timeout, _time_out, futures)
        try:
            if len(futures) == 1:
                return [await futures[0]]
            return list(await asyncio.gather(*futures))
        except BaseException:
            self._forget(futures)
            raise
        finally:
            timer.cancel()

    def forget(self, futures: Sequence[asyncio.Future[Msg]]) -> None:
        """Stop waiting for these replies (their requests' caller gave up on them)."""
        self._forget(futures)

    def _forget(self, futures: Sequence[asyncio.Future[Msg]]) -> None:
        link = self._bound.current()
        if link is None:
            return
        gone = set(futures)
        for token in [t for t, f in link.replies.items() if f in gone]:
            del link.replies[token]

    async def request(
        self, subject: str, payload: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> Msg:
        (reply,) = await self.replies([await self.send(subject, payload, headers)])
        if status_of(reply) == "503":
            raise nats.errors.NoRespondersError
        return reply

    async def publish(
        self, subject: str, payload: bytes = b"", headers: Mapping[str, str] | None = None,
        reply: str = "",
    ) -> None:
        """Fire and forget (acks and NAKs of task messages, wake-ups)."""
        _, nc = self._live()
        await nc.publish(subject, payload, reply=reply, headers=dict(headers) if headers else None)

    def publish_soon(self, subject: str, payload: bytes) -> None:
        """Fire and forget, with the next request (within DEFER seconds): acks and NAKs
        of task messages. Dropped if the connection is down: the message then comes
        back after the consumer's AckWait, and its claim finds out what to do with it."""
        link = self._bound.current()
        if link is None:
            return
        link.deferred.append((subject, payload))
        if link.flushing is None:
            link.flushing = asyncio.get_running_loop().call_later(DEFER, self._flush_later, link)

    def _flush_later(self, link: Link) -> None:
        link.flushing = None
        if link.deferred:
            task = asyncio.ensure_future(self._flush(link))
            task.add_done_callback(_quiet)

    async def _flush(self, link: Link) -> None:
        if link.flushing is not None:
            link.flushing.cancel()
            link.flushing = None
        items, link.deferred = link.deferred, []
        nc = link.nc
        if nc is None or not nc.is_connected:
            return
        for subject, payload in items:
            await nc.publish(subject, payload)

    async def flush_soon(self) -> None:
        """Send what publish_soon holds now (before a close)."""
        link = self._bound.current()
        if link is not None and link.deferred:
            with contextlib.suppress(Exception):
                await self._flush(link)

    async def api(self, subject: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """One JetStream API request; errors raised as nats-py's APIError family."""
        try:
            msg = await self.request(subject, json.dumps(payload).encode())
        except nats.errors.NoRespondersError:
            raise nats.js.errors.ServiceUnavailableError from None
        data: dict[str, Any] = json.loads(msg.data)
        _api_error(data)
        return data


def ack_of(reply: Msg) -> dict[str, Any]:
    """A JetStream publish ack (stream, seq, duplicate), or its error raised."""
    if status_of(reply) == "503":  # no stream takes the subject (or no JetStream)
        raise nats.js.errors.NoStreamResponseError
    data: dict[str, Any] = json.loads(reply.data)
    _api_error(data)
    return data


def bound_cb(fn: Callable[..., Awaitable[R]], *args: Any) -> Callable[..., Awaitable[R]]:
    """An async callback with bound arguments that nats-py accepts as a coroutine
    function (it checks with asyncio.iscoroutinefunction, which a plain partial fails)."""

    async def bound(*more: Any) -> R:
        return await fn(*args, *more)

    return bound


def _quiet(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("NATS: deferred acks not sent: %s", describe(task.exception() or Exception()))


def _time_out(futures: Sequence[asyncio.Future[Msg]]) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(TimeoutError())
            future.exception()  # awaited by `replies`, which raises the first one


async def within(future: asyncio.Future[Any], timeout: float | None) -> bool:
    """Wait up to `timeout` seconds for `future` (shared: it is never cancelled here);
    True when it is done. Not asyncio.wait_for: in Python 3.11 that can swallow a
    cancellation racing its result (gh-86296), and a worker whose background task
    swallowed its cancellation never stops."""
    if future.done():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = None if timeout is None else loop.call_later(max(0.0, timeout), wake)
    future.add_done_callback(wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        future.remove_done_callback(wake)
    return future.done()


async def _on_reply(link: Link, msg: Msg) -> None:
    future = link.replies.pop(msg.subject[len(link.inbox):], None)
    if future is not None and not future.done():
        future.set_result(msg)


def _abandon(link: Link, forked: bool) -> None:
    """Forget a link: closed, or of a parent process (its socket is the parent's: never
    touched) or of another loop (nothing of it can be awaited here)."""
    link.nc = link.js = None
    link.replies.clear()
    link.extras.clear()


# --- JetStream primitives ---------------------------------------------------


async def ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    """Create the stream unless it exists; concurrent creators with one config all succeed."""
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError as exc:
        await _created_by_someone_else(js, config.name or "", exc)
        # Exists with other settings (an admin's edits, an older omniq): use it as it is.


async def widen_dedupe_window(js: JetStreamContext, stream: str, window: float) -> None:
    """Give a stream made by an older omniq (the server's 2 minute default) our window."""
    info = await js.stream_info(stream)
    config = info.config
    if config.duplicate_window is not None and config.duplicate_window >= window:
        return
    config.duplicate_window = window
    with contextlib.suppress(nats.js.errors.BadRequestError):  # an admin's limits: keep them
        await js.update_stream(config)


async def ensure_bucket(js: JetStreamContext, name: str) -> None:
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


async def purge(
    conn: Connection, stream: str, subject: str | None, below: int | None = None
) -> int:
    """Remove every message of `subject` (optionally only below a sequence); no markers left."""
    req: dict[str, Any] = {}
    if subject is not None:
        req["filter"] = subject
    if below is not None:
        req["seq"] = below
    data = await conn.api(f"$JS.API.STREAM.PURGE.{stream}", req)
    return int(data.get("purged", 0))


async def scan(
    conn: Connection,
    stream: str,
    subject: str,
    *,
    last_only: bool = False,
    headers_only: bool = False,
    start_seq: int | None = None,
    start_time: float | None = None,
    limit: int | None = None,
) -> AsyncIterator[Msg]:
    """Messages of `subject` in stream order through a short-lived ephemeral consumer,
    pulled SCAN_BATCH at a time; from `start_seq`, or those stored since `start_time`."""
    if last_only:
        policy = api.DeliverPolicy.LAST_PER_SUBJECT
    elif start_time is not None:
        policy = api.DeliverPolicy.BY_START_TIME
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
    ).as_dict()
    if policy == api.DeliverPolicy.BY_START_TIME:
        assert start_time is not None
        # The server takes RFC 3339 (nats-py's field is an int).
        config["opt_start_time"] = datetime.fromtimestamp(start_time, UTC).isoformat()
    pulled = _Pulled(conn)
    sub = await conn.nc.subscribe(conn.nc.new_inbox(), cb=pulled.on_message)
    created = await conn.api(f"$JS.API.CONSUMER.CREATE.{stream}",
                             {"stream_name": stream, "config": config})
    name = created["name"]
    try:
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}"
        left = math.inf if limit is None else limit
        while left > 0:
            batch = await pulled.next(next_subject, sub.subject, int(min(SCAN_BATCH, left)))
            for msg in batch:
                yield msg
            left -= len(batch)
            if pulled.ended:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await conn.api(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", {})


class _Pulled:
    """The answer to one pull request of a scan: up to `size` messages, then the end of
    the batch (everything there was delivered, or `size` reached)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._msgs: list[Msg] = []
        self._size = 0
        self._done: asyncio.Future[None] | None = None
        self.ended = False

    async def next(self, next_subject: str, inbox: str, size: int) -> list[Msg]:
        self._msgs, self._size = [], size
        self._done = asyncio.get_running_loop().create_future()
        request = json.dumps({"batch": size, "no_wait": True}).encode()
        await self._conn.publish(next_subject, request, reply=inbox)
        if not await within(self._done, self._conn.timeout):
            raise TimeoutError
        return self._msgs

    async def on_message(self, msg: Msg) -> None:
        status = status_of(msg)
        if status == "100":
            return
        if status is not None:  # 404 / 408: everything there was has been delivered
            self._end(ended=True)
            return
        self._msgs.append(msg)
        if msg.metadata.num_pending == 0:
            self._end(ended=True)
        elif len(self._msgs) >= self._size:
            self._end(ended=False)

    def _end(self, ended: bool) -> None:
        self.ended = self.ended or ended
        if self._done is not None and not self._done.done():
            self._done.set_result(None)


class Reader:
    """An ephemeral consumer of `subject` that starts at a stream sequence or a time.
    Its creation tells where it really starts (`start`: a sequence below the stream's
    first is raised to it) and how many messages of the subject lie from there to the
    stream's end (`pending`): a caller reading a range of sequences pulls just those."""

    def __init__(self, conn: Connection, stream: str, name: str, created: Mapping[str, Any]):
        self._conn = conn
        self._stream = stream
        self._name = name
        self.start = int(created["delivered"]["stream_seq"]) + 1
        self.pending = int(created["num_pending"])
        self._pulled = _Pulled(conn)
        self._sub: Any = None

    @classmethod
    async def open(
        cls, conn: Connection, stream: str, subject: str, *, seq: int = 0, at: int = 0
    ) -> Reader:
        """From sequence `seq`, or from the first message stored at or after `at` (us)."""
        config: dict[str, Any] = {
            "ack_policy": "none", "filter_subject": subject, "mem_storage": True,
            "inactive_threshold": int(SCAN_IDLE * 1e9), "max_deliver": -1,
        }
        if at:
            config.update(deliver_policy="by_start_time", opt_start_time=rfc3339(at))
        else:
            config.update(deliver_policy="by_start_sequence", opt_start_seq=max(1, seq))
        created = await conn.api(f"$JS.API.CONSUMER.CREATE.{stream}",
                                 {"stream_name": stream, "config": config})
        return cls(conn, stream, created["name"], created)

    @property
    def ended(self) -> bool:
        """Everything there was has been delivered."""
        return self._pulled.ended

    async def pull(self, size: int) -> list[Msg]:
        """Up to `size` more messages, SCAN_BATCH per pull request."""
        if self._sub is None:
            self._sub = await self._conn.nc.subscribe(self._conn.nc.new_inbox(),
                                                      cb=self._pulled.on_message)
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{self._name}"
        out: list[Msg] = []
        while len(out) < size and not self.ended:
            out += await self._pulled.next(subject, self._sub.subject,
                                           min(SCAN_BATCH, size - len(out)))
        return out

    async def close(self) -> None:
        """Delete it without waiting for the answer (its idle timeout is the backstop)."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self._conn.publish(f"$JS.API.CONSUMER.DELETE.{self._stream}.{self._name}")


@dataclass(frozen=True)
class Entry:
    """One KV value with its revision and headers."""

    key: str
    rev: int
    data: bytes
    headers: Mapping[str, str]
    stored: float = 0.0  # when the server stored it (scans only)

    def text(self, name: str) -> str:
        return self.headers.get(name, "")

    def number(self, name: str) -> float:
        value = self.headers.get(name)
        return float(value) if value else 0.0


class Bucket:
    """The KV primitives we need, as raw JetStream calls: direct get, compare-and-set, purge.

    Keys are removed by purging their subject rather than with KV delete markers:
    a marker per finished task would stay in the bucket forever.
    """

    def __init__(self, conn: Connection, name: str) -> None:
        self._conn = conn
        self.name = name
        self.stream = f"KV_{name}"
        self.pre = f"$KV.{name}."

    def subject(self, key: str) -> str:
        return self.pre + key

    # Each operation is a `send_*` that puts the request on the wire and returns its
    # reply future, and a `*_of(reply)` that reads the reply: a caller with several
    # independent operations sends them all, then awaits their replies together.

    async def send_get(self, key: str) -> asyncio.Future[Msg]:
        return await self._conn.send(f"$JS.API.DIRECT.GET.{self.stream}.{self.pre}{key}", b"")

    def entry_of(self, key: str, msg: Msg) -> Entry | None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "404":
            return None
        if status == "503":
            raise nats.js.errors.ServiceUnavailableError
        if status:
            nats.js.errors.APIError.from_msg(msg)
        if headers.get("KV-Operation") in _KV_DELETED:
            return None
        return Entry(key, int(headers["Nats-Sequence"]), msg.data, headers)

    async def get(self, key: str) -> Entry | None:
        (reply,) = await self._conn.replies([await self.send_get(key)])
        return self.entry_of(key, reply)

    async def send_put(
        self, key: str, data: bytes, headers: Mapping[str, str], last: int | None = None
    ) -> asyncio.Future[Msg]:
        """Write; with `last`, only if the key is still at that revision (0 = absent)."""
        hdrs = dict(headers)
        if last is not None:
            hdrs["Nats-Expected-Last-Subject-Sequence"] = str(last)
        return await self._conn.send(self.pre + key, data, hdrs)

    @staticmethod
    def rev_of(reply: Msg) -> int | None:
        """The new revision, or None when the compare-and-set lost."""
        try:
            ack = ack_of(reply)
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQ:
                return None
            raise
        return int(ack["seq"])

    async def put(
        self, key: str, data: bytes, headers: Mapping[str, str], last: int | None = None
    ) -> int | None:
        (reply,) = await self._conn.replies([await self.send_put(key, data, headers, last)])
        return self.rev_of(reply)

    async def purge(self, key: str) -> bool:
        return await purge(self._conn, self.stream, self.pre + key) > 0

    async def send_purge_at(self, key: str, rev: int) -> asyncio.Future[Msg]:
        """Remove the key only while it is still at revision `rev`: a fenced delete in one
        request. With history 1 a newer write has already replaced `rev`, so purging the
        subject's messages up to `rev` finds nothing then."""
        req = {"filter": self.pre + key, "seq": rev + 1}
        return await self._conn.send(f"$JS.API.STREAM.PURGE.{self.stream}",
                                     json.dumps(req).encode())

    @staticmethod
    def purged_of(reply: Msg) -> bool:
        if status_of(reply) == "503":
            raise nats.js.errors.ServiceUnavailableError
        data = json.loads(reply.data)
        _api_error(data)
        return int(data.get("purged", 0)) > 0

    async def purge_at(self, key: str, rev: int) -> bool:
        (reply,) = await self._conn.replies([await self.send_purge_at(key, rev)])
        return self.purged_of(reply)

    async def scan(
        self, pattern: str, *, headers_only: bool, since: float | None = None
    ) -> AsyncIterator[Entry]:
        """The keys matching `pattern`; with `since`, only those written since then (each
        key keeps one message, its latest, so no older value of a key shows up)."""
        async for msg in scan(
            self._conn, self.stream, self.pre + pattern, last_only=since is None,
            start_time=since, headers_only=headers_only,
        ):
            headers = msg.headers or {}
            if headers.get("KV-Operation") in _KV_DELETED:
                continue
            key = msg.subject[len(self.pre):]
            meta = msg.metadata
            yield Entry(key, meta.sequence.stream, msg.data, headers, meta.timestamp.timestamp())


async def in_chunks(items: Sequence[Any], fn: Callable[[Any], Awaitable[R]]) -> list[R]:
    out: list[R] = []
    for i in range(0, len(items), CHUNK):
        out.extend(await asyncio.gather(*(fn(item) for item in items[i : i + CHUNK])))
    return out
