"""Private redis-server, nats-server and PostgreSQL instances that tests may stop and restart.

Tests that kill or restart a server must never touch the shared ones (6379, 4222,
5432): they start one of these on a free port instead. Each server owns a
temporary directory (data, logs, sockets) removed by `close()`. A missing binary
skips the test locally and fails it when CI=true (`require`).

    with private_redis(password="s3cret") as redis:   # persistent (AOF, fsync always)
        redis.url                                      # redis://:s3cret@127.0.0.1:PORT/0
        redis.restart(pause=1.0)                       # stop, wait, start on the same port
    with private_nats(jetstream=False) as nats: ...   # nats.url
    with private_postgres() as pg: ...                 # pg.url == pg.dsn; initdb + pg_ctl as
                                                       # the postgres user when run as root
    with private_server("nats", password="pw") as server: ...    # any of the three by name

Also here: probes of the shared servers and removal of a test's namespace on them.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
LOCALHOST = "127.0.0.1"
START_LIMIT = 30.0  # seconds a server may take to accept connections (a bound, not a speed check)

SHARED_REDIS = f"redis://{LOCALHOST}:6379/0"
SHARED_NATS = f"nats://{LOCALHOST}:4222"
SHARED_POSTGRES = os.environ.get(
    "OMNIQ_TEST_POSTGRES_DSN", f"postgresql://postgres@{LOCALHOST}:5432/test"
)
_SHARED_PORTS = {"redis": 6379, "nats": 4222, "postgres": 5432}
_DRIVERS = {"redis": "redis", "nats": "nats", "postgres": "psycopg"}


def require(reason: str | None, what: str) -> None:
    """Skip the test because of `reason` (None: carry on); fail it instead in CI."""
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI but unavailable: {reason}")
    pytest.skip(f"{what} unavailable: {reason}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = LOCALHOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


# --- the private servers -------------------------------------------------------------------

_live: set[PrivateServer] = set()


class PrivateServer:
    """A server process of our own on a free port; start/stop/restart keep port and data."""

    kind = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"omniq-{self.kind}-"))
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # subclasses: the command line, and what "ready" means
    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        """Where clients connect: a URL or DSN (with the password, if any)."""
        raise NotImplementedError

    def ready(self) -> bool:
        return port_open(self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            # Own session: a Ctrl-C meant for pytest does not stop the server under a test.
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=out, start_new_session=True
            )
        _live.add(self)
        deadline = time.monotonic() + START_LIMIT
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError(f"private {self.kind} did not start: {self.log[-500:]}")
            time.sleep(0.05)

    def stop(self, kill: bool = False) -> None:
        """Stop (SIGTERM: a clean shutdown, or SIGKILL: a crash) and wait until the port is free."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(START_LIMIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        self.stop(kill=True)

    def restart(self, pause: float = 1.0, kill: bool = False) -> None:
        """Stop, stay down `pause` seconds, start again on the same port with the same data."""
        self.stop(kill=kill)
        time.sleep(pause)
        self.start()

    def close(self) -> None:
        """Stop for good and remove the data directory."""
        with contextlib.suppress(Exception):
            self.stop(kill=True)
        _live.discard(self)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisServer(PrivateServer):
    """redis-server; `persistent` keeps data over restarts (AOF, fsync on every write)."""

    kind = "redis"

    def __init__(self, password: str | None = None, persistent: bool = True) -> None:
        super().__init__()
        self.password = password
        self.persistent = persistent

    def command(self) -> list[str]:
        args = [_binary("redis-server"), "--port", str(self.port), "--bind", LOCALHOST,
                "--dir", str(self.dir), "--save", "", "--protected-mode", "no"]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def ready(self) -> bool:
        # Answers PING (or asks for the password) only once the data set is loaded.
        try:
            with socket.create_connection((LOCALHOST, self.port), timeout=0.5) as sock:
                sock.settimeout(0.5)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{LOCALHOST}:{self.port}/0"


class NatsServer(PrivateServer):
    """nats-server, with JetStream stored in its own directory unless `jetstream=False`."""

    kind = "nats"

    def __init__(self, *args: str, jetstream: bool = True, password: str | None = None) -> None:
        super().__init__()
        self.jetstream = jetstream
        self.password = password  # user "omniq" must give it
        self.args = args

    def command(self) -> list[str]:
        args = [_binary("nats-server"), "-a", LOCALHOST, "-p", str(self.port), *self.args]
        if self.jetstream:
            args += ["-js", "-sd", str(self.dir / "jetstream")]
        if self.password:
            args += ["--user", "omniq", "--pass", self.password]
        return args

    @property
    def url(self) -> str:
        auth = f"omniq:{self.password}@" if self.password else ""
        return f"nats://{auth}{LOCALHOST}:{self.port}"


class PostgresServer(PrivateServer):
    """A throw-away cluster (initdb, trust auth) run by pg_ctl, as `postgres` when we are root."""

    kind = "postgres"

    def __init__(self, password: str | None = None) -> None:
        self.bindir = _postgres_bindir()
        super().__init__()
        # Trust auth ignores it: it is in the DSN so tests can check it is never shown.
        self.password = password
        self.data = self.dir / "data"
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, self.user)

    @property
    def dsn(self) -> str:
        auth = f"postgres:{self.password}" if self.password else "postgres"
        return f"postgresql://{auth}@{LOCALHOST}:{self.port}/postgres"

    @property
    def url(self) -> str:
        return self.dsn

    def _pg(self, program: str, *args: str) -> None:
        argv = [os.path.join(self.bindir, program), *args]
        if self.user:
            argv = ["runuser", "-u", self.user, "--", *argv]
        try:
            subprocess.run(argv, check=True, capture_output=True, timeout=60)
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or b"").decode(errors="replace").strip()[-500:]
            raise RuntimeError(f"{program} failed: {detail}") from None

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def start(self) -> None:
        _live.add(self)
        if not self.data.exists():  # first start: the cluster is made here, so close() cleans up
            self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses={LOCALHOST} "
                   "-c fsync=off -c max_connections=60")
        self._pg("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log_path),
                 "-w", "-t", str(int(START_LIMIT)), "start")

    def stop(self, kill: bool = False) -> None:
        """Fast shutdown (connections cut), or immediate (no checkpoint: like a crash)."""
        if self.running:
            mode = "immediate" if kill else "fast"
            self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )
    if found is None:
        raise FileNotFoundError(f"{name} is not installed")
    return found


def _postgres_bindir() -> str:
    def version(path: str) -> int:
        part = Path(path).parts[-3]
        return int(part) if part.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    initdb = found[-1] if found else shutil.which("initdb")
    if not initdb:
        raise FileNotFoundError("initdb is not installed")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        raise FileNotFoundError("runuser is needed to run PostgreSQL as the postgres user")
    return str(Path(initdb).parent)


@contextlib.contextmanager
def _started(kind: str, build: Any) -> Iterator[Any]:
    try:
        server = build()
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        require(str(exc), f"a private {kind}")
        raise
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        server.close()
        require(str(exc), f"a private {kind}")
        raise
    try:
        yield server
    finally:
        server.close()


def private_redis(
    password: str | None = None, persistent: bool = True
) -> AbstractContextManager[RedisServer]:
    """Context manager: a started RedisServer (skip/fail when redis-server is missing)."""
    return _started("redis-server", lambda: RedisServer(password, persistent))


def private_nats(
    *args: str, jetstream: bool = True, password: str | None = None
) -> AbstractContextManager[NatsServer]:
    """Context manager: a started NatsServer; extra nats-server arguments in `args`."""
    return _started("nats-server", lambda: NatsServer(*args, jetstream=jetstream,
                                                      password=password))


def private_postgres(password: str | None = None) -> AbstractContextManager[PostgresServer]:
    """Context manager: a started PostgresServer (initdb in a temporary directory)."""
    return _started("PostgreSQL", lambda: PostgresServer(password))


def private_server(
    tech: str, password: str | None = None
) -> AbstractContextManager[PrivateServer]:
    """Context manager: a started private server of `tech` (redis, nats or postgres).

    Data survives restarts. `password` is required by redis (requirepass) and nats (user
    "omniq"), and part of the PostgreSQL DSN; `server.url` carries it."""
    if tech == "redis":
        return private_redis(password=password)
    if tech == "nats":
        return private_nats(password=password)
    if tech == "postgres":
        return private_postgres(password=password)
    raise ValueError(f"no private server for {tech!r}")


@atexit.register
def _close_leftovers() -> None:
    # A test run interrupted between start and close must not leave servers behind.
    for server in list(_live):
        server.close()


# --- the shared servers --------------------------------------------------------------------


def shared_unavailable(tech: str) -> str | None:
    """Why the shared server of `tech` (redis, nats, postgres) cannot be used, or None."""
    try:
        __import__(_DRIVERS[tech])
    except ImportError:
        return f"the {_DRIVERS[tech]} package is not installed"
    port = _SHARED_PORTS[tech]
    if not port_open(port):
        return f"no {tech} server on {LOCALHOST}:{port}"
    return None


def drop_namespace(tech: str, name: str, where: str | None = None) -> None:
    """Remove what a test stored under prefix/schema `name`; best effort, never raises."""
    with contextlib.suppress(Exception):
        if tech == "redis":
            _drop_redis(name, where or SHARED_REDIS)
        elif tech == "postgres":
            _drop_postgres(name, where or SHARED_POSTGRES)
        elif tech == "nats":
            import asyncio

            asyncio.run(_drop_nats(name, where or SHARED_NATS))


def _drop_redis(prefix: str, url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


def _drop_postgres(schema: str, dsn: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


async def _drop_nats(prefix: str, url: str) -> None:
    import nats

    async def quiet(exc: Exception) -> None:  # nats-py logs a traceback by default
        pass

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1, error_cb=quiet)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            name = info.config.name or ""
            if name.startswith((prefix + "_", f"KV_{prefix}_")):
                await js.delete_stream(name)
    finally:
        await nc.close()
