"""One NATS Backend per (servers, credentials, prefix) in a process: one connection and
JetStream context shared by the three roles, and the fused operations on them."""

from __future__ import annotations

import os
import ssl
from collections.abc import Awaitable, Callable, Generator, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import nats.js.errors

from omniq.backend import forget_shared, shared
from omniq.errors import BackendUnavailable, OmniQError
from omniq.models import Delivery, Task, TaskEvent, TaskResult
from omniq.storage import EventStorage, ResultStorage, TaskQueue, runs_now, started_event

from .connection import (
    DEFAULT_SERVERS,
    REQUEST_TIMEOUT,
    Connection,
    Link,
    boundary,
    check_prefix,
    connect_options,
    server_list,
    stream_gone,
    translate,
)

if TYPE_CHECKING:
    from .queue import NATSQueue, Receipt
    from .stores import NATSEventStorage, NATSResultStorage

S = TypeVar("S", bound="Store")
T = TypeVar("T")
ROLES = ("queue", "results", "events")


@dataclass(frozen=True)
class NATSSettings:
    """A NATS store's settings (its config keys without the role prefix)."""

    servers: Sequence[str] | str | None = None
    url: str | None = None
    host: str | None = None
    port: int | None = None
    username: str | None = None
    password: str | None = None
    prefix: str = "omniq"
    tls: bool | ssl.SSLContext | None = None
    options: Mapping[str, Any] | None = None  # nats-py connect options (and "token")
    request_timeout: float = REQUEST_TIMEOUT

    def server_urls(self) -> list[str]:
        if self.servers is not None:
            return server_list(self.servers)
        if self.url:
            return server_list(str(self.url))
        if self.host or self.port:
            return [f"nats://{self.host or 'localhost'}:{self.port or 4222}"]
        return list(DEFAULT_SERVERS)

    def key(self) -> Hashable:
        """What makes two stores share a Backend: the same place and credentials."""
        tls = self.tls if isinstance(self.tls, bool | None) else id(self.tls)
        options = tuple(sorted((k, repr(v)) for k, v in (self.options or {}).items()))
        return ("nats", tuple(self.server_urls()), self.username, self.password, self.prefix,
                tls, options, self.request_timeout)


def backend_for(settings: NATSSettings) -> NATSBackend:
    """The process's Backend for these settings."""
    return shared(settings.key(), lambda: NATSBackend(settings))


class NATSBackend:
    """The three roles on one NATS account and prefix, over one connection (per process
    and event loop), with the fused operations (omniq.storage.FusedOps).

    JetStream has no transaction across streams and buckets, so a fused operation is the
    fewest sequential round trips its order guarantees allow, with everything independent
    sent in one write to the socket and its replies awaited together:

    - submit: the task's state with its ENQUEUED event (1), then the task's message,
      which makes it claimable, once the event is stored (1). A task with a unique key:
      the key is taken before the event is written (4).
    - claim: the compare-and-set leases of a whole batch (1), then the STARTED events of
      those won (1): 2 per batch, where the generic path takes 2 per task. A redelivered
      task's result is read first (1 more, only then): one whose worker died between its
      result and its ack is settled instead of run again.
    - finish: the result, a conditional create (1), then the outcome event with the fenced
      removal of the task's state (1); the message's ack rides on a later write.

    The generic path needs as many round trips per task for submit and finish; what the
    fused ones save is writes to the socket (each a system call that wakes the server)
    and, for claims, the per-task round trips of a batch.
    """

    def __init__(self, settings: NATSSettings) -> None:
        self.settings = settings
        self.prefix = check_prefix(settings.prefix)
        options = dict(settings.options or {})
        token = options.pop("token", None)
        self.conn = Connection(
            settings.server_urls(),
            connect_options(settings.username, settings.password, token, settings.tls, options),
            settings.request_timeout,
        )
        self._roles: dict[str, Store] = {}
        self._users = 0
        self._state: tuple[int, dict[str, Any]] = (os.getpid(), {})

    # --- roles --------------------------------------------------------------------------

    def queue(self) -> TaskQueue:
        return self._queue()

    def results(self) -> ResultStorage:
        return self._results()

    def events(self) -> EventStorage:
        return self._events()

    def _queue(self) -> NATSQueue:
        from .queue import NATSQueue

        return self._role(NATSQueue)

    def _results(self) -> NATSResultStorage:
        from .stores import NATSResultStorage

        return self._role(NATSResultStorage)

    def _events(self) -> NATSEventStorage:
        from .stores import NATSEventStorage

        return self._role(NATSEventStorage)

    def _role(self, cls: type[S]) -> S:
        store = self._roles.get(cls.ROLE)
        if store is None:
            store = self._roles[cls.ROLE] = cls.on(self)
        assert isinstance(store, cls)
        return store

    def process_state(self, name: str, make: Callable[[], T]) -> T:
        """State of this process (a forked child starts without its parent's)."""
        pid, state = self._state
        if pid != os.getpid():
            pid, state = self._state = (os.getpid(), {})
        if name not in state:
            state[name] = make()
        value: T = state[name]
        return value

    # --- the connection's users -----------------------------------------------------------

    def acquire(self) -> None:
        """A store began using the connection."""
        self._users += 1
        shared(self.settings.key(), lambda: self)  # back in the cache if it had left it

    async def release(self) -> None:
        """A store closed; the last one closes the connection."""
        self._users = max(0, self._users - 1)
        if self._users:
            return
        link = self.conn.current()
        if link is not None and link.usable() and link.nc is not None and link.nc.is_connected:
            await self._queue().teardown(link)  # the only role with state on the link
        await self.conn.close()
        forget_shared(self.settings.key())

    async def ready(self, store: Store) -> Link:
        """The connected link, with the store's streams and buckets in place."""
        link = await self.conn.open()
        if store.ROLE in link.ready:
            return link
        async with link.lock:
            if store.ROLE not in link.ready:
                try:
                    await store._setup()
                except nats.js.errors.ServiceUnavailableError:
                    raise BackendUnavailable(
                        f"JetStream is not enabled on {self.conn.url()}; start nats-server with -js"
                    ) from None
                link.ready.add(store.ROLE)
        return link

    def translate(self, exc: BaseException, roles: Sequence[str] = ROLES) -> OmniQError | None:
        """Driver errors as omniq's (omniq.backend.boundary calls it)."""
        if stream_gone(exc):
            link = self.conn.current()
            if link is not None:
                link.ready.difference_update(roles)  # an admin deleted it: recreate on use
        return translate(exc, self.conn.where, self.conn.timeout)

    # --- fused operations -------------------------------------------------------------------

    @boundary
    async def submit(self, task: Task, event: TaskEvent) -> str:
        queue, events = self._queue(), self._events()
        await events.ready()
        if task.unique_key is not None:
            # A duplicate must leave no event: the event only once the key is ours.
            return await queue.put_task(task, _Later(events.write, [event]))
        # The state and the ENQUEUED event go out together; the message, which makes the
        # task claimable, only once the event is stored (ENQUEUED sorts first).
        written = await events.send([event])
        return await queue.put_task(task, _Later(events.acked, written))

    @boundary
    async def claim(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int, worker_id: str
    ) -> list[Delivery]:
        queue = self._queue()
        await self._events().ready()
        got = await queue.claim_many(queues, lease, timeout, limit)
        try:
            return await self._started(got, worker_id)
        except BaseException:
            # The claims stand, unseen by the caller: the next claim re-finds them (same
            # claim tokens, so their STARTED events, if stored, are not stored twice).
            queue.held_again(got)
            raise

    async def _started(self, got: list[Delivery], worker_id: str) -> list[Delivery]:
        settled = await self._settled(got)
        run = [d for d in got if d.task_id not in settled]
        events = [started_event(d, worker_id) for d in run if runs_now(d)]
        await self._events().write(events)
        return run

    async def _settled(self, got: list[Delivery]) -> set[str]:
        """Redelivered tasks whose result is stored (their worker died before its ack):
        acked (dead-lettered if the result failed), not run again."""
        again = [d for d in got if d.attempt > 1 and d.problem is None]
        if not again:
            return set()
        found = await self._results().read_many([d.task_id for d in again])
        done = set()
        queue = self._queue()
        for d, result in zip(again, found, strict=True):
            if result is not None:
                await queue.settle(_receipt(d), not result.ok)
                done.add(d.task_id)
        return done

    @boundary
    async def finish(
        self, delivery: Delivery, result: TaskResult, event: TaskEvent, *, failed: bool
    ) -> bool:
        queue, results, events = self._queue(), self._results(), self._events()
        r = _receipt(delivery)
        await results.ready()
        await events.ready()
        if not await results.put(result):
            await queue.settle(r, failed)  # fenced: changes nothing once the lease is lost
            return False
        # Independent once the result is stored: the event and the state's removal (or
        # dead letter) go out in one write, and their replies are awaited together.
        written = await events.send([event])
        first = None if failed else await queue.send_done(r)
        await queue.settle(r, failed, first)
        await events.acked(written)
        return True


def _receipt(delivery: Delivery) -> Receipt:
    from .queue import receipt_of

    return receipt_of(delivery)


class _Later(Generic[T]):
    """A call made only when awaited: what must be done before a task's message goes out."""

    def __init__(self, call: Callable[[T], Awaitable[None]], arg: T) -> None:
        self._call, self._arg = call, arg

    def __await__(self) -> Generator[Any, None, None]:
        return self._call(self._arg).__await__()


# --- the stores' common part ----------------------------------------------------------------


class Store:
    """A role on a NATSBackend: `NATSQueue(servers, prefix=...)` and the like find (or
    make) the process's Backend for those settings, as `backend.queue()` does."""

    ROLE: ClassVar[str]
    backend: NATSBackend

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
        extra = dict(options or {})
        if token is not None:
            extra["token"] = token
        settings = NATSSettings(
            servers=servers, prefix=prefix, username=username, password=password, tls=tls,
            options=extra or None, request_timeout=request_timeout,
        )
        self._bind(backend_for(settings))

    @classmethod
    def on(cls: type[S], backend: NATSBackend) -> S:
        store = cls.__new__(cls)
        store._bind(backend)
        return store

    def _bind(self, backend: NATSBackend) -> None:
        self.backend = backend
        self.prefix = backend.prefix
        self._conn = backend.conn
        # Who uses this store: `backend.queue()` hands the same object to every user of
        # the place in the process (a client, its embedded worker, `omniq status`'s
        # probe), so each open() counts, and a store used without open() counts once.
        self._opens = 0
        self._lazy = False
        self._name_things()

    def _name_things(self) -> None:
        """Names of this store's streams and buckets (they depend on the prefix)."""

    async def _setup(self) -> None:
        """Create this role's streams and buckets (idempotent)."""

    def translate(self, exc: BaseException) -> OmniQError | None:
        return self.backend.translate(exc, (self.ROLE,))

    async def _ready(self) -> Link:
        if not self._opens and not self._lazy:
            self._lazy = True
            self.backend.acquire()
        return await self.backend.ready(self)

    async def ready(self) -> Link:
        return await self._ready()

    @boundary
    async def open(self) -> None:
        self._opens += 1
        self.backend.acquire()
        try:
            await self._ready()
        except BaseException:
            await self.close()  # not opened: its caller will not close it
            raise

    async def close(self) -> None:
        if self._opens:
            self._opens -= 1
        elif self._lazy:
            self._lazy = False
        else:
            return
        await self.backend.release()

    async def __aenter__(self: S) -> S:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
