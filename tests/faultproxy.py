"""A TCP proxy that loses requests and replies on demand, for tests of idempotent writes.

It sits between a client and a real server (a private one, or the shared one: it only
drops connections of its own) and runs on its own thread, so synchronous tests and
the client's event loop are not involved:

    with FaultProxy("127.0.0.1", 6379) as proxy:      # proxy.port: where clients connect
        proxy.lose_reply(match=b"EVALSHA")     # forward the next matching request, then
                                               # hang up before its reply gets back
        proxy.lose_request(match=b"INSERT")    # hang up instead of forwarding it
        proxy.delay_reply(6.0, match=b"PUB")   # hold its reply past the client's timeout
        proxy.chaos(0.05, kinds=("lose_reply", "lose_request"), match=b"...")  # at random
        proxy.injected                          # Counter of faults done, by kind

A "request" is one chunk read from the client (one command, or a pipelined batch);
its "reply" is the next chunk the server sends back on that connection. `match`
picks the requests a fault may hit (a substring of the chunk); without it any
request after the connection's first exchange (its handshake) qualifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

KINDS = ("lose_request", "lose_reply", "delay_reply")


@dataclass
class _Fault:
    kind: str
    match: bytes | None
    times: int
    delay: float = 0.0


@dataclass
class _Chaos:
    rate: float
    kinds: tuple[str, ...]
    match: bytes | None
    delay: float
    rng: random.Random = field(default_factory=lambda: random.Random(7))


class FaultProxy:
    """Listens on 127.0.0.1:`port` and forwards to `host`:`upstream_port`."""

    def __init__(self, host: str, upstream_port: int) -> None:
        self.host = host
        self.upstream_port = upstream_port
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self._faults: list[_Fault] = []
        self._chaos: _Chaos | None = None
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._conns: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(started,), name="fault-proxy", daemon=True
        )
        self._thread.start()
        started.wait(10)
        if self._server is None:
            raise RuntimeError("the fault proxy did not start")
        self.port: int = self._server.sockets[0].getsockname()[1]

    # --- what the test asks for -------------------------------------------------------

    def lose_request(self, match: bytes | None = None, times: int = 1) -> None:
        self._add(_Fault("lose_request", match, times))

    def lose_reply(self, match: bytes | None = None, times: int = 1) -> None:
        self._add(_Fault("lose_reply", match, times))

    def delay_reply(self, seconds: float, match: bytes | None = None, times: int = 1) -> None:
        self._add(_Fault("delay_reply", match, times, seconds))

    def chaos(
        self,
        rate: float,
        kinds: tuple[str, ...] = ("lose_request", "lose_reply"),
        match: bytes | None = None,
        delay: float = 0.0,
        seed: int = 7,
    ) -> None:
        """Hit each qualifying request with probability `rate` (0 turns chaos off)."""
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}")
        with self._lock:
            self._chaos = (
                _Chaos(rate, kinds, match, delay, random.Random(seed)) if rate > 0 else None
            )

    def calm(self) -> None:
        """No more faults (those already in progress finish)."""
        with self._lock:
            self._faults.clear()
            self._chaos = None

    @property
    def pending(self) -> int:
        """Faults asked for and not done yet."""
        with self._lock:
            return sum(f.times for f in self._faults)

    def drop_all(self) -> None:
        """Hang up every proxied connection now (both ways)."""
        asyncio.run_coroutine_threadsafe(self._drop_all(), self._loop).result(10)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- choosing a fault for one request ---------------------------------------------

    def _add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _pick(self, chunk: bytes, first: bool) -> _Fault | None:
        with self._lock:
            self.requests += 1
            for fault in self._faults:
                if self._qualifies(fault.match, chunk, first):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    self.injected[fault.kind] += 1
                    return fault
            chaos = self._chaos
            if (
                chaos is not None
                and self._qualifies(chaos.match, chunk, first)
                and chaos.rng.random() < chaos.rate
            ):
                kind = chaos.rng.choice(chaos.kinds)
                self.injected[kind] += 1
                return _Fault(kind, chaos.match, 1, chaos.delay)
        return None

    @staticmethod
    def _qualifies(match: bytes | None, chunk: bytes, first: bool) -> bool:
        if match is None:
            return not first
        return match in chunk

    # --- the proxy itself (on its own loop) ----------------------------------------------

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

        try:
            self._loop.run_until_complete(start())
        finally:
            started.set()
        self._loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            writer.close()
            self._conns.discard(task)
            return
        link = _Link(self, reader, writer, up_reader, up_writer)
        try:
            await link.run()
        finally:
            link.hang_up()
            self._conns.discard(task)

    async def _drop_all(self) -> None:
        tasks = list(self._conns)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._drop_all()


class _Link:
    """One proxied connection: client -> server and server -> client pumps."""

    def __init__(
        self,
        proxy: FaultProxy,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.reader, self.writer = reader, writer
        self.up_reader, self.up_writer = up_reader, up_writer
        self.reply_fault: _Fault | None = None
        self.closed = asyncio.Event()

    async def run(self) -> None:
        pumps = [asyncio.create_task(self._requests()), asyncio.create_task(self._replies())]
        try:
            await self.closed.wait()
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _requests(self) -> None:
        first = True
        try:
            while True:
                chunk = await self.reader.read(65536)
                if not chunk:
                    break
                fault = self.proxy._pick(chunk, first)
                first = False
                if fault is not None and fault.kind == "lose_request":
                    break
                if fault is not None:
                    self.reply_fault = fault
                self.up_writer.write(chunk)
                await self.up_writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        self.closed.set()

    async def _replies(self) -> None:
        try:
            while True:
                chunk = await self.up_reader.read(65536)
                if not chunk:
                    break
                fault, self.reply_fault = self.reply_fault, None
                if fault is not None and fault.kind == "lose_reply":
                    break
                if fault is not None and fault.kind == "delay_reply":
                    await asyncio.sleep(fault.delay)
                self.writer.write(chunk)
                await self.writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        self.closed.set()

    def hang_up(self) -> None:
        for w in (self.writer, self.up_writer):
            with contextlib.suppress(Exception):
                transport: Any = w.transport
                transport.abort()  # RST, like a dropped network path: no orderly close
