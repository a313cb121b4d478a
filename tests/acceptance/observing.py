"""Helpers of the issue-12 tests (metrics, `omniq top`, the dashboard).

- `place` fixture: an isolated OmniQ deployment on SQLite (default files under a fresh
  OMNIQ_HOME) or on the shared Redis under a key prefix of its own (dropped afterwards,
  never flushed); `sqlite_place` for tests not about the stores. `place.env` for
  subprocesses, `place.api` (a sync OmniQ that runs nothing itself) to enqueue quickly.
- `scrape(port)`: /metrics of a worker, parsed with prometheus_client's parser.
- `wait_until(check, limit)`: poll until `check()` is truthy.
- `artifacts(name)`: a directory for screenshots; OMNIQ_TEST_ARTIFACTS=DIR keeps them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import servers
from tests.acceptance.conftest import clean_env
from tests.acceptance.test_server_backends import store_env

TECHS = ("sqlite", "redis")


class Place:
    def __init__(self, tech: str, home: Path, env: dict[str, str]) -> None:
        self.tech = tech
        self.home = home
        self.env = env
        self._api: Any = None

    @property
    def api(self) -> Any:
        if self._api is None:
            from omniq import OmniQ
            from omniq.config import OmniQConfig

            config = OmniQConfig.load(env=self.env, use_files=False, embedded_worker="off")
            self._api = OmniQ(config)
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close(drain=False)


@pytest.fixture(params=TECHS)
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Place]:
    tech = request.param
    env = clean_env(tmp_path / "home")
    prefix = f"omniq-web-{uuid.uuid4().hex[:10]}"
    if tech == "redis":
        servers.require(servers.shared_unavailable("redis"), "the shared Redis")
        env.update(store_env(("redis",) * 3, prefix, tmp_path / "files"))
    found = Place(tech, tmp_path / "home", env)
    try:
        yield found
    finally:
        found.close()
        if tech == "redis":
            servers.drop_namespace("redis", prefix)


@pytest.fixture
def sqlite_place(tmp_path: Path) -> Iterator[Place]:
    """`place` on SQLite only, for tests about something else than the stores."""
    found = Place("sqlite", tmp_path / "home", clean_env(tmp_path / "home"))
    try:
        yield found
    finally:
        found.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def wait_until(
    check: Callable[[], Any],
    limit: float = 20.0,
    what: str = "condition",
    show: Callable[[], Any] | None = None,
) -> Any:
    """Poll `check` until truthy; on timeout the error says `what` and shows `show()`."""
    deadline = time.monotonic() + limit
    while True:
        with contextlib.suppress(OSError):
            value = check()
            if value:
                return value
        if time.monotonic() > deadline:
            seen = f"; seen:\n{show()}" if show is not None else ""
            raise AssertionError(f"timed out after {limit:g}s waiting for {what}{seen}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[str], timeout: float = 20) -> tuple[int, str]:
    """SIGTERM, then its exit code and stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err or ""


def artifacts(name: str, tmp_path: Path) -> Path:
    """Where a test saves its screenshots: OMNIQ_TEST_ARTIFACTS/name if set, else tmp_path."""
    base = os.environ.get("OMNIQ_TEST_ARTIFACTS")
    where = Path(base) / name if base else tmp_path / "artifacts"
    where.mkdir(parents=True, exist_ok=True)
    return where


def require_tool(name: str, package: str) -> str:
    """The tool's path; skips locally and fails in CI when it is missing."""
    found = shutil.which(name)
    servers.require(None if found else f"{name} is not installed (apt-get install {package})",
                    name)
    assert found is not None
    return found
