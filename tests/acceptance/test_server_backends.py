"""The `omniq` command on Redis, PostgreSQL and NATS (and mixed): main flow and bad input.

Stores are configured through OMNIQ_* environment variables only, as a user would;
each test gets its own prefix/schema on the shared servers, removed afterwards.
Servers that must be misconfigured are private ones (tests/servers.py).

Also holds the helpers test_resilience.py imports: `ServerHome`, `store_env`, `deploy`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import servers
from tests.acceptance.test_worker_daemon import Home, wait_until

SERVER_TECHS = ("redis", "postgres", "nats")
ROLES = ("TASK_QUEUE", "RESULT_STORAGE", "EVENT_STORAGE")
# Which settings point a store at its server, and which one separates namespaces.
_LOCATION = {"redis": ("URL", "PREFIX"), "nats": ("URL", "PREFIX"), "postgres": ("DSN", "SCHEMA")}
_SHARED = {
    "redis": servers.SHARED_REDIS,
    "nats": servers.SHARED_NATS,
    "postgres": servers.SHARED_POSTGRES,
}


def store_env(
    techs: Sequence[str], namespace: str, files: Path, where: Mapping[str, str] | None = None
) -> dict[str, str]:
    """OMNIQ_* variables for queue, results and events on `techs` (one per role, in order).

    `where` maps a technology to its URL/DSN (default: the shared server); sqlite keeps
    its default files under OMNIQ_HOME and file stores go under `files`.
    """
    env: dict[str, str] = {}
    for role, tech in zip(ROLES, techs, strict=True):
        env[f"OMNIQ_{role}_TYPE"] = tech
        if tech in _LOCATION:
            location, separator = _LOCATION[tech]
            env[f"OMNIQ_{role}_{location}"] = (where or {}).get(tech, _SHARED[tech])
            env[f"OMNIQ_{role}_{separator}"] = namespace
        elif tech == "file":
            env[f"OMNIQ_{role}_BASE_DIR"] = str(files)
    return env


class ServerHome(Home):
    """A Home whose stores are set by environment variables (servers, file or sqlite)."""

    def __init__(self, path: Path, env: Mapping[str, str]) -> None:
        super().__init__(path)
        self.env.update(env)

    @property
    def api(self) -> Any:
        if self._api is None:
            from omniq import OmniQ
            from omniq.config import OmniQConfig

            self._api = OmniQ(OmniQConfig.load(env=self.env, use_files=False))
        return self._api

    def events(self, task_id: str) -> list[str]:
        return [e.event_type.value for e in self.api.get_events(task_id)]

    def poll(self, check: Callable[[], Any], limit: float = 60.0, what: str = "condition") -> Any:
        """wait_until, where the stores being unreachable for a while means "not yet"."""
        from omniq.errors import BackendUnavailable

        def attempt() -> Any:
            try:
                return check()
            except BackendUnavailable:
                return None

        return wait_until(attempt, limit, what)

    def outcome(self, task_id: str, limit: float = 60.0) -> Any:
        """The stored result once its outcome event was written too (the worker's last step)."""

        def done() -> Any:
            if not {"completed", "failed"} & set(self.events(task_id)):
                return None
            return self.api.wait_result(task_id, timeout=0)

        return self.poll(done, limit, f"outcome of task {task_id}")


Deploy = Callable[..., ServerHome]


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[Deploy]:
    """deploy(techs, where=None, **env) -> a ServerHome; namespaces dropped afterwards.

    `techs` is one technology for all three stores or a (queue, results, events) triple.
    """
    made: list[tuple[ServerHome, list[tuple[str, str, str]]]] = []

    def make(techs: str | Sequence[str], where: Mapping[str, str] | None = None,
             **extra: str) -> ServerHome:
        triple = (techs,) * 3 if isinstance(techs, str) else tuple(techs)
        for tech in set(triple) & set(_LOCATION):
            if where is None or tech not in where:
                servers.require(servers.shared_unavailable(tech), f"the shared {tech} server")
        namespace = "acc_" + uuid.uuid4().hex[:10]
        path = tmp_path / f"home{len(made)}"
        path.mkdir()
        env = store_env(triple, namespace, path / "files", where)
        home = ServerHome(path, {**env, **extra})
        # Only the shared servers keep data after the test; private ones are deleted.
        drops = [(t, namespace, _SHARED[t]) for t in set(triple) & set(_LOCATION)
                 if t not in (where or {})]
        made.append((home, drops))
        return home

    yield make
    for home, drops in made:
        home.close()
        for tech, namespace, location in drops:
            servers.drop_namespace(tech, namespace, location)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    return lines[0]


# --- the main flow -----------------------------------------------------------------------------

LAYOUTS = {
    "redis": "redis",
    "postgres": "postgres",
    "nats": "nats",
    "mixed": ("redis", "postgres", "nats"),
}


class Tail:
    """`omniq tail --json` in the background, its stdout in a file the test reads."""

    def __init__(self, home: ServerHome) -> None:
        self.out = home.path / "tail.jsonl"
        self.err = home.path / "tail.err"
        # --since: the backlog first, so events written while tail starts up are not missed.
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [*_cli(), "tail", "--json", "--since", "1h"], cwd=home.path, env=home.env,
                stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            )

    def records(self, task_id: str) -> list[dict[str, Any]]:
        if self.proc.poll() is not None:
            raise AssertionError(f"tail exited: {self.err.read_text()}")
        lines = self.out.read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["task_id"] == task_id]

    def kinds(self, task_id: str) -> list[str]:
        return [r["event_type"] for r in self.records(task_id)]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def _cli() -> list[str]:
    from tests.acceptance.conftest import CLI

    return list(CLI)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_main_flow_is_unchanged(layout: str, deploy: Deploy) -> None:
    home = deploy(LAYOUTS[layout])
    tail = Tail(home)
    try:
        task_id = home.enqueue("omniq.examples:add", "2", "3")
        # Seen by tail before the worker starts: started/completed then arrive live.
        wait_until(lambda: tail.kinds(task_id) == ["enqueued"], 30, "the enqueued event in tail")
        status = home.run("status", "--json")
        assert status.returncode == 0, status.stderr
        queues = json.loads(status.stdout)["queues"]
        assert [(q["queue"], q["queued"]) for q in queues] == [("default", 1)]

        burst = home.burst()
        assert f"task {task_id} add@default completed" in burst.stderr
        result = home.run("result", task_id)
        assert (result.returncode, result.stdout.strip()) == (0, "5"), result.stderr
        events = home.run("events", task_id, "--json")
        assert events.returncode == 0, events.stderr
        kinds = [json.loads(line)["event_type"] for line in events.stdout.splitlines()]
        assert kinds == ["enqueued", "started", "completed"]

        wait_until(lambda: len(tail.kinds(task_id)) >= 3, 30, "started/completed in tail")
        records = tail.records(task_id)
        assert [r["event_type"] for r in records] == ["enqueued", "started", "completed"]
        assert records[2]["worker_id"] and records[2]["worker_id"] == records[1]["worker_id"]
    finally:
        assert tail.stop() == 0, tail.err.read_text()


# --- bad input: one clear line, the right exit code, no secret -------------------------------

SECRET = "S3cret-pw"


def assert_clean_failure(proc: subprocess.CompletedProcess[str], code: int, *secrets: str) -> str:
    """Exit `code` with one line on stderr, nothing on stdout, no secret, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    for secret in (SECRET, *secrets):
        assert secret not in proc.stderr
    return one_line(proc.stderr)


def check_report(proc: subprocess.CompletedProcess[str], *secrets: str) -> list[str]:
    """`omniq config check` found unreachable stores: exit 69, one line each; those lines."""
    assert proc.returncode == 69, (proc.stdout, proc.stderr)
    assert proc.stderr == ""
    for secret in (SECRET, *secrets):
        assert secret not in proc.stdout
    rows = proc.stdout.strip().splitlines()
    assert len(rows) == 3
    return [row for row in rows if "UNREACHABLE" in row]


def _unreachable_url(tech: str) -> str:
    port = servers.free_port()  # nothing listens there
    return {
        "redis": f"redis://:{SECRET}@127.0.0.1:{port}/0",
        "postgres": f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/test",
        "nats": f"nats://bob:{SECRET}@127.0.0.1:{port}",
    }[tech]


@pytest.mark.parametrize("tech", SERVER_TECHS)
def test_unreachable_server_is_one_line_exit_69(tech: str, tmp_path: Path) -> None:
    url = _unreachable_url(tech)
    port = url.rsplit(":", 1)[1].split("/")[0]
    home = ServerHome(tmp_path, store_env((tech, "sqlite", "sqlite"), "bad", tmp_path, {tech: url}))
    try:
        [row] = check_report(home.run("config", "check"))
        assert row.startswith("task_queue") and port in row
        for args in (("enqueue", "omniq.examples:add", "1", "2"), ("worker",), ("status",)):
            line = assert_clean_failure(home.run(*args), 69)
            assert port in line and ("unavailable" in line or "cannot connect" in line)
    finally:
        home.close()


def test_wrong_redis_password_is_one_line_exit_69(tmp_path: Path) -> None:
    with servers.private_redis(password="the-right-pw") as redis:
        url = f"redis://:{SECRET}@127.0.0.1:{redis.port}/0"
        home = ServerHome(tmp_path, store_env(["redis"] * 3, "pw", tmp_path, {"redis": url}))
        try:
            rows = check_report(home.run("config", "check"), "the-right-pw")
            assert len(rows) == 3 and all("password" in row for row in rows)
            for args in (("enqueue", "omniq.examples:add", "1", "2"), ("worker",)):
                line = assert_clean_failure(home.run(*args), 69, "the-right-pw")
                assert f"127.0.0.1:{redis.port}" in line and "password" in line
            right = redis.url.replace(SECRET, "the-right-pw")
            ok = home.run("config", "check", env={f"OMNIQ_{r}_URL": right for r in ROLES})
            assert ok.returncode == 0 and "the-right-pw" not in ok.stdout, ok.stdout
        finally:
            home.close()


def test_jetstream_disabled_is_one_line_exit_69(tmp_path: Path) -> None:
    with servers.private_nats(jetstream=False) as nats:
        home = ServerHome(tmp_path, store_env(["nats"] * 3, "nojs", tmp_path, {"nats": nats.url}))
        try:
            rows = check_report(home.run("config", "check"))
            assert len(rows) == 3 and all("start nats-server with -js" in r for r in rows)
            for args in (("enqueue", "omniq.examples:add", "1", "2"), ("worker",)):
                line = assert_clean_failure(home.run(*args), 69)
                assert line.endswith(f"JetStream is not enabled on {nats.url}; "
                                     "start nats-server with -js")
        finally:
            home.close()


# Redis and NATS document a strict prefix alphabet (ConfigError); PostgreSQL quotes any
# schema name it can hold and refuses only empty, over-long, NUL and pg_* names.
REJECTED = [
    ("redis", "my app:1"),
    ("redis", "{tag}"),
    ("nats", "a.b"),
    ("nats", "star*"),
    ("postgres", "pg_mine"),
    ("postgres", "x" * 64),
]


@pytest.mark.parametrize(("tech", "name"), REJECTED, ids=[f"{t}-{n[:8]}" for t, n in REJECTED])
def test_rejected_namespace_is_a_config_error(
    tech: str, name: str, deploy: Deploy
) -> None:
    home = deploy(tech)
    location, separator = _LOCATION[tech]
    env = {f"OMNIQ_{role}_{separator}": name for role in ROLES}
    # Refused before any connection is made: the credentials must not show up either.
    with_secret = _unreachable_url(tech).replace("127.0.0.1:", "db.example:")
    env.update({f"OMNIQ_{role}_{location}": with_secret for role in ROLES})
    commands = (("enqueue", "omniq.examples:add", "1", "2"), ("worker", "--burst"),
                ("config", "check"))
    for args in commands:
        line = assert_clean_failure(home.run(*args, env=env), 78)
        assert ("prefix" if tech != "postgres" else "schema name") in line


ODD_SCHEMA = 'Odd "schema" name; DROP'


def test_odd_postgres_schema_is_quoted_and_works(deploy: Deploy) -> None:
    home = deploy("postgres")
    odd = f"{ODD_SCHEMA} {uuid.uuid4().hex[:6]}"
    env = {f"OMNIQ_{role}_SCHEMA": odd for role in ROLES}
    home.env.update(env)
    try:
        task_id = home.enqueue("omniq.examples:add", "20", "22")
        home.burst()
        result = home.run("result", task_id)
        assert (result.returncode, result.stdout.strip()) == (0, "42"), result.stderr
        assert home.run("config", "check").returncode == 0
    finally:
        servers.drop_namespace("postgres", odd)
