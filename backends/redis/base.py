"""What the three Redis stores share: their Backend (found by settings when a store is
built on its own, as the seed's constructors do), prefix and lifecycle."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

import redis.asyncio as aioredis

from omniq.backend import boundary
from omniq.errors import OmniQError

from .connection import Connection, RedisSettings

if TYPE_CHECKING:
    from .backend import RedisBackend

S = TypeVar("S", bound="RedisStore")
T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")
Method = Callable[Concatenate[T, P], Coroutine[Any, Any, R]]
BATCH = 500  # items one cleanup/purge script call handles, so Redis is never blocked long


def guarded(method: Method[T, P, R]) -> Method[T, P, R]:
    """`omniq.backend.boundary`, typed as the coroutine function it returns (so the
    stores still satisfy the role Protocols)."""
    return cast("Method[T, P, R]", boundary(method))


def ms(value: datetime | None) -> int:
    return 0 if value is None else int(value.timestamp() * 1000)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def ms_ceil(value: datetime) -> int:
    """The first whole millisecond at or after `value`, exactly (no float on the way):
    for a stored whole `t`, t >= value iff t >= ms_ceil(value), and likewise for <."""
    if value.tzinfo is None:
        value = value.astimezone(UTC)
    return -((EPOCH - value) // _MS)


def from_ms(value: int) -> datetime:
    """The time of a stored millisecond count, exactly: ms_ceil(from_ms(t)) == t."""
    return EPOCH + value * _MS


def pairs(found: Any) -> list[tuple[bytes, bytes]]:
    """An HGETALL reply: a dict (redis-py's parser) or a flat list."""
    if isinstance(found, dict):
        return list(found.items())
    return list(zip(found[::2], found[1::2], strict=True))


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisStore:
    """A role of one RedisBackend. Built on its own (`RedisQueue(host=...)`), a store
    joins the process's Backend for those settings, so stores built apart still share
    one connection and the fused operations."""

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        db: int = 0,
        *,
        username: str | None = None,
        password: str | None = None,
        url: str | None = None,
        prefix: str = "omniq",
        tls: bool = False,
        options: Mapping[str, Any] | None = None,
        backend: RedisBackend | None = None,
        **client_options: Any,
    ) -> None:
        if backend is None:
            from .backend import backend_for

            settings = RedisSettings(
                url=url, host=host, port=port, db=db, username=username, password=password,
                prefix=prefix, tls=tls, options={**(options or {}), **client_options},
            )
            backend = backend_for(settings)
        self.backend = backend
        self._conn: Connection = backend.conn
        self.prefix = backend.settings.prefix
        self._p = self.prefix + ":"
        self._opened = False  # counted among the Backend's users

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._conn.where!r}, prefix={self.prefix!r})"

    def translate(self, exc: BaseException) -> OmniQError | None:
        return self._conn.translate(exc)

    @guarded
    async def open(self) -> None:
        await self.backend.open_store(counted=not self._opened)
        self._opened = True

    async def close(self) -> None:
        """Close this store; the Backend's last open store closes the connection."""
        if self._opened:
            self._opened = False
            await self.backend.close_store()
        elif not self.backend.in_use:  # used without open(): its connection goes too
            await self._conn.close()

    async def __aenter__(self: S) -> S:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _redis(self) -> aioredis.Redis:
        return self._conn.client()

    async def _script(self, name: str, *args: Any) -> Any:
        return await self._conn.script(name, self._p, *args)
