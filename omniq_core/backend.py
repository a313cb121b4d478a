"""What every technology's Backend shares: its settings, one Backend per place and
process, driver errors translated at one boundary, and state bound to one process
and event loop.

A technology is one `Backend` object built from a frozen settings object. It owns
the connection, pool or listener for its server+database+prefix (or its files) and
hands out the three roles; stores of the same settings in a process share it, and
each store keeps a `backend` attribute, so the worker and client can tell when one
Backend holds all of their stores and use its fused operations
(`omniq.storage.FusedOps`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Coroutine, Hashable, Mapping
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar, runtime_checkable

from omniq.errors import ConfigError, OmniQError
from omniq.storage import EventStorage, ResultStorage, TaskQueue

T = TypeVar("T")
S = TypeVar("S")
B = TypeVar("B")
P = ParamSpec("P")
R = TypeVar("R")


@runtime_checkable
class Backend(Protocol):
    """One technology at one place; its roles are typed, so mypy checks that each
    store satisfies its Protocol."""

    def queue(self) -> TaskQueue: ...
    def results(self) -> ResultStorage: ...
    def events(self) -> EventStorage: ...


# --- settings -------------------------------------------------------------------------------


def parse_settings(cls: type[S], technology: str, values: Mapping[str, Any]) -> S:
    """A frozen settings dataclass from config values; unknown keys refused, once,
    naming the known ones (no technology ignores a setting silently)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"the {technology} backend does not use {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(sorted(known))}"
        )
    return cls(**{k: v for k, v in values.items() if v is not None})


# --- one Backend per place and process --------------------------------------------------------

_shared: dict[tuple[int, Hashable], Any] = {}
_shared_lock = threading.Lock()


def shared(key: Hashable, build: Callable[[], B]) -> B:
    """The Backend for `key` in this process, built on first use. A forked child builds
    its own (the parent's sockets and threads are not its to use)."""
    full = (os.getpid(), key)
    with _shared_lock:
        found = _shared.get(full)
        if found is None:
            found = _shared[full] = build()
        backend: B = found
        return backend


def forget_shared(key: Hashable) -> None:
    """Drop a Backend from the cache (its last store closed)."""
    with _shared_lock:
        _shared.pop((os.getpid(), key), None)


# --- driver errors ----------------------------------------------------------------------------


class Translates(Protocol):
    def translate(self, exc: BaseException) -> OmniQError | None:
        """The omniq error for a driver error; None for an error that is not one."""


Method = Callable[Concatenate[S, P], Coroutine[Any, Any, R]]


def boundary(method: Method[S, P, R]) -> Method[S, P, R]:
    """Decorate a store's public async methods: driver errors leave as omniq.errors
    (through the owner's `translate`), everything else unchanged."""

    @functools.wraps(method)
    async def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except OmniQError:
            raise
        except Exception as exc:
            translated = self.translate(exc)  # type: ignore[attr-defined]
            if translated is None:
                raise
            raise translated from exc

    return wrapper


# --- state bound to one process and event loop -------------------------------------------------


class Bound(Generic[T]):
    """A value (client, pool, listener) made for one process and one event loop, made
    again in a forked child or under another loop.

    `abandon(value, forked)` releases an old one: in a forked child it must not touch
    the parent's sockets (`forked` is True); under a new loop in the same process it
    may close them without awaiting.
    """

    def __init__(
        self,
        make: Callable[[], T],
        abandon: Callable[[T, bool], None] | None = None,
    ) -> None:
        self._make = make
        self._abandon = abandon
        self._value: T | None = None
        self._pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        if self._value is None or self._pid != os.getpid() or self._loop is not loop:
            self.drop()
            self._value = self._make()
            self._pid, self._loop = os.getpid(), loop
        return self._value

    def current(self) -> T | None:
        """The value if it belongs to this process and the running loop, else None."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if self._value is not None and self._pid == os.getpid() and self._loop is loop:
            return self._value
        return None

    def drop(self) -> None:
        """Forget the value (abandoning it when it was made elsewhere)."""
        value, self._value = self._value, None
        if value is not None and self._abandon is not None:
            self._abandon(value, self._pid != os.getpid())
