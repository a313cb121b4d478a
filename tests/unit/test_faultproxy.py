"""The fault proxy the idempotency tests rely on: each fault does what it says."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faultproxy import FaultProxy


class Echo:
    """A line server that records each request and answers 'ok <line>'."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.seen: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1024):
                self.seen.append(data)
                conn.sendall(b"ok " + data)


def ask(port: int, *lines: bytes, timeout: float = 2.0) -> list[bytes | None]:
    """Send lines one at a time on one connection; None where no reply came."""
    out: list[bytes | None] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        for line in lines:
            try:
                conn.sendall(line)
                reply = conn.recv(1024) or None
            except OSError:
                reply = None
            out.append(reply)
            if reply is None:
                break
    return out


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo()
    yield server
    server.sock.close()


def test_forwards_untouched(echo: Echo) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        assert ask(proxy.port, b"hello", b"again") == [b"ok hello", b"ok again"]
        assert proxy.injected == {}


def test_lost_reply_reaches_the_server_but_not_the_client(echo: Echo) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.lose_reply(match=b"write")
        assert ask(proxy.port, b"hello", b"write 1", b"later") == [b"ok hello", None]
        time.sleep(0.1)
        assert b"write 1" in echo.seen
        assert proxy.injected["lose_reply"] == 1 and proxy.pending == 0


def test_lost_request_never_reaches_the_server(echo: Echo) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.lose_request(match=b"write")
        assert ask(proxy.port, b"write 2") == [None]
        time.sleep(0.1)
        assert b"write 2" not in echo.seen


def test_delayed_reply_comes_late(echo: Echo) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.delay_reply(1.5, match=b"slow")
        assert ask(proxy.port, b"slow", timeout=0.5) == [None]
        assert b"slow" in echo.seen


def test_chaos_hits_some_requests_only(echo: Echo) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.chaos(0.3, kinds=("lose_reply",), match=b"x")
        replies = [ask(proxy.port, b"x")[0] for _ in range(40)]
        lost = replies.count(None)
        assert 0 < lost < 40 and proxy.injected["lose_reply"] == lost
