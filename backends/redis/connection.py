"""The settings of a Redis Backend and its one connection: a redis-py client per process
and event loop, auto-pipelined script calls, and the translation of driver errors."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from omniq.backend import Bound
from omniq.errors import BackendError, BackendUnavailable, ConfigError, OmniQError, redact

from .scripts import BY_SHA, SHAS, SOURCES

PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_STREAM_MAXLEN = 1_000_000
DEFAULT_EVENT_TTL = 30 * 86400.0  # safety net; cleanup(before) is the real retention
_UNAVAILABLE = (
    rexc.ConnectionError,  # includes AuthenticationError and BusyLoadingError
    rexc.TimeoutError,
    rexc.NoPermissionError,
    rexc.ReadOnlyError,
    OSError,
)
# Options that belong to us or that we set ourselves; the rest go to redis-py.
# redis-py's retry options are ours too: it would re-send a command whose reply was
# lost, and a script sent twice must be the caller's choice, never the driver's.
_RESERVED = {"self", "host", "port", "db", "username", "password", "ssl",
             "connection_pool", "decode_responses", "single_connection_client",
             "unix_socket_path", "auto_close_connection_pool",
             "retry", "retry_on_error", "retry_on_timeout"}
_CLIENT_OPTIONS = set(inspect.signature(aioredis.Redis.__init__).parameters) - _RESERVED
# Clients of a parent process or of a finished loop stay referenced, never collected:
# finalizing a client closes its transports, and in a forked child that unregisters
# the parent's sockets from the epoll set both processes share.
_ORPHANS: list[Any] = []


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    """Where a Redis Backend is: server, database, credentials and key prefix.

    `options` go to redis.asyncio.Redis (socket_timeout, ssl_ca_certs, max_connections,
    ...; its retry options are refused), except ours: `stream_maxlen` (approximate cap
    of the event stream, default 1,000,000) and `event_ttl` (seconds a finished task's
    record, with its events, lives; default 30 days; 0 or None: until cleanup).
    """

    url: str | None = None
    host: str = "localhost"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    prefix: str = "omniq"
    tls: bool = False
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not PREFIX_RE.match(self.prefix):
            raise ConfigError(
                f"Redis prefix {self.prefix!r} is invalid: use 1-64 letters, digits, '_', "
                "'.' or '-', starting with a letter or digit (no ':', spaces or braces)"
            )
        if self.url:
            _checked_url(self.url, self.tls)
        opts = dict(self.options)
        opts.pop("ssl", None)
        for own in ("stream_maxlen", "event_ttl", "socket_timeout"):
            opts.pop(own, None)
        _checked_options(opts)
        maxlen = self.stream_maxlen
        if not isinstance(maxlen, int) or isinstance(maxlen, bool) or maxlen < 1:
            raise ConfigError(f"Redis option stream_maxlen must be a positive integer, "
                              f"got {maxlen!r}")
        ttl = self.options.get("event_ttl", DEFAULT_EVENT_TTL) or 0
        if not isinstance(ttl, int | float) or ttl < 0:
            raise ConfigError(f"Redis option event_ttl must be seconds >= 0, got {ttl!r}")

    @property
    def key(self) -> tuple[Any, ...]:
        """Equal for settings that reach the same data the same way."""
        return (self.url, self.host, self.port, self.db, self.username, self.password,
                self.prefix, self.tls, repr(sorted(self.options.items())))

    @property
    def stream_maxlen(self) -> Any:
        return self.options.get("stream_maxlen", DEFAULT_STREAM_MAXLEN)

    @property
    def record_ttl_ms(self) -> int:
        return int((self.options.get("event_ttl", DEFAULT_EVENT_TTL) or 0) * 1000)

    @property
    def tls_on(self) -> bool:
        return self.tls or bool(self.options.get("ssl", False))  # redis-py's name too


class Link:
    """A client and its batcher, made for one process and event loop."""

    def __init__(self, client: aioredis.Redis, timeout: float | None) -> None:
        self.client = client
        self.batcher = _Batcher(client, timeout)
        self.sub: Any = None  # the results' Pub/Sub listener (stores.Subscriber)


class Connection:
    """The client of one Backend (rebuilt after a fork or on a new loop), script calls
    by EVALSHA, and the translation of driver errors."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        url = _checked_url(settings.url, settings.tls_on) if settings.url else None
        self.url = url
        self.where = _where(url) if url else f"{settings.host}:{settings.port}"
        self._secret = settings.password or (urlsplit(url).password if url else None)
        opts = dict(settings.options)
        for own in ("ssl", "stream_maxlen", "event_ttl"):
            opts.pop(own, None)
        # Replies are timed by us, per round trip: redis-py's own socket_timeout
        # costs an extra asyncio task on every send.
        self.timeout: float | None = opts.pop("socket_timeout", 5.0)
        self._kwargs: dict[str, Any] = {
            "db": settings.db,
            "username": settings.username,
            "password": settings.password,
            "socket_timeout": None,
            "socket_connect_timeout": 5.0,
            "protocol": 2,  # stable reply shapes across redis-py versions
            "retry": Retry(NoBackoff(), 0),  # never re-send: see the package docstring
            **opts,
        }
        if not url:
            self._kwargs.update(host=settings.host, port=settings.port, ssl=settings.tls_on)
        self._link: Bound[Link] = Bound(self._new_link, _orphan)

    def _new_link(self) -> Link:
        if self.url:
            client = aioredis.Redis.from_url(self.url, **self._kwargs)
        else:
            client = aioredis.Redis(**self._kwargs)
        return Link(client, self.timeout)

    def link(self) -> Link:
        return self._link.get()

    def client(self) -> aioredis.Redis:
        """The client for blocking commands and Pub/Sub (each takes its own connection)."""
        return self._link.get().client

    def current(self) -> Link | None:
        """The link if it belongs to this process and loop, else None."""
        return self._link.current()

    async def close(self) -> None:
        link = self.current()
        if link is None:  # another process's or a finished loop's: left alone
            self._link.drop()
            return
        self._link = Bound(self._new_link, _orphan)
        if link.sub is not None:
            await link.sub.close()
        with contextlib.suppress(rexc.RedisError, OSError):
            await link.client.aclose()

    async def call(self, *args: Any) -> Any:
        """One non-blocking command, pipelined with those of concurrent callers."""
        return await self._link.get().batcher.call(args)

    async def script(self, name: str, *args: Any) -> Any:
        return await self.call("EVALSHA", SHAS[name], 0, *args)

    @contextlib.asynccontextmanager
    async def deadline(self, seconds: float | None) -> AsyncIterator[None]:
        """Bound a blocking call: `seconds` of waiting plus the reply timeout."""
        limit = None if self.timeout is None or seconds is None else seconds + self.timeout
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            raise rexc.TimeoutError(f"no reply within {limit:.1f} s") from None

    def translate(self, exc: BaseException) -> OmniQError | None:
        if not isinstance(exc, rexc.RedisError | OSError):
            return None
        detail = " ".join(str(exc).split()) or type(exc).__name__
        if self._secret:
            detail = detail.replace(self._secret, "***")
        detail = redact(detail)
        if len(detail) > 300:
            detail = detail[:297] + "..."
        if isinstance(exc, _UNAVAILABLE):
            return BackendUnavailable(f"Redis at {self.where} is unavailable: {detail}")
        return BackendError(f"Redis at {self.where} failed: {detail}")


class _Batcher:
    """Auto-pipelining: the commands issued while a round trip is in flight go
    out together in the next one.

    On a busy host a loopback round trip costs ~100 us of CPU in syscalls and
    redis-py, a pipelined command a few us: concurrent tasks of a worker share
    round trips instead of paying one each.
    """

    def __init__(self, client: aioredis.Redis, timeout: float | None) -> None:
        self._client = client
        self._timeout = timeout
        self._waiting: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def call(self, args: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((args, fut))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    replies = await self._send([args for args, _ in batch])
                except Exception as exc:
                    _settle(batch, None, exc)
                except BaseException:
                    _settle(batch, None, rexc.ConnectionError("connection closed"))
                    raise
                else:
                    _settle(batch, replies, None)
                # Let the callers just answered issue their next commands first.
                await asyncio.sleep(0)
        finally:
            self._drainer = None
            if self._waiting:  # cancelled with callers left: they must not hang
                _settle(self._waiting, None, rexc.ConnectionError("connection closed"))
                self._waiting = []

    async def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Replies (a ResponseError instance where one command failed); a lost
        connection raises for the whole batch."""
        replies = await self._execute(commands)
        missing = [i for i, r in enumerate(replies) if isinstance(r, rexc.NoScriptError)]
        if missing:
            # The server restarted or SCRIPT FLUSH ran: load the scripts again.
            for sha in {commands[i][1] for i in missing}:
                await self._client.script_load(SOURCES[BY_SHA[sha]])
            again = await self._execute([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        try:
            async with asyncio.timeout(self._timeout):
                if len(commands) == 1:
                    try:
                        return [await self._client.execute_command(*commands[0])]
                    except rexc.ResponseError as exc:
                        return [exc]
                pipe = self._client.pipeline(transaction=False)
                for args in commands:
                    pipe.execute_command(*args)
                return await pipe.execute(raise_on_error=False)
        except TimeoutError:
            # The connection was dropped by redis-py on cancel: no stray reply later.
            raise rexc.TimeoutError(f"no reply within {self._timeout} s") from None


def _orphan(link: Link, forked: bool) -> None:
    _ORPHANS.append(link)


def _settle(
    batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]],
    replies: list[Any] | None,
    error: Exception | None,
) -> None:
    for i, (_, fut) in enumerate(batch):
        if fut.done():
            continue
        reply = replies[i] if replies is not None else error
        if isinstance(reply, Exception):
            fut.set_exception(reply)
        else:
            fut.set_result(reply)


def _checked_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - _CLIENT_OPTIONS)
    if unknown:
        raise ConfigError(
            f"unknown Redis option(s) {', '.join(map(repr, unknown))}; "
            "options are passed to redis.asyncio.Redis (e.g. socket_timeout, ssl_ca_certs)"
        )
    return dict(options)


def _checked_url(url: str, tls: bool) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            "Redis url must start with redis://, rediss:// or unix:// "
            f"(got {parts.scheme + '://' if parts.scheme else 'no scheme'})"
        )
    if tls and parts.scheme == "redis":
        return urlunsplit(parts._replace(scheme="rediss"))
    return url


def _where(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigError("Redis url has an invalid port") from None
    return f"{parts.hostname or 'localhost'}:{port}"
