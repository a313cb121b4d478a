"""Run the real `omniq` command in subprocesses, each test in its own clean world.

Stable helpers for every acceptance test:

- `clean_env(home, **extra)`: os.environ without OMNIQ_* (and systemd) variables,
  with OMNIQ_HOME=home and a private XDG config dir, so no user or machine config
  file leaks in; `extra` is added on top.
- `cli_env` fixture: `clean_env(tmp_path / "home")`; commands run in `tmp_path`.
- `run_omniq(args, env=None, input=None, timeout=60, cwd=None) -> (code, stdout, stderr)`:
  one finished `omniq` run (`env=None` gives a fresh temporary home).
- `start_omniq(args, env, cwd=None, **popen_kwargs) -> Popen`: a long-running one
  (tail, worker), text mode, stdout/stderr piped unless told otherwise.
- `run_burst(env)`: `omniq worker --burst`, asserting it exits 0.

`OMNIQ_TEST_CLI="path/to/omniq"` tests an installed command instead of this checkout.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

CLI = shlex.split(os.environ.get("OMNIQ_TEST_CLI", "")) or [sys.executable, "-m", "omniq.cli"]
_DROPPED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "NO_COLOR")


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("OMNIQ_") or key == "OMNIQ_TEST_CLI"
    }
    for key in _DROPPED:
        env.pop(key, None)
    env["OMNIQ_HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home.parent / "xdg-config")  # no user omniq.yaml
    env["OMNIQ_WORKER_POLL_INTERVAL"] = "0.2"  # a burst worker ends one poll after the last task
    env.update(extra)
    return env


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment whose OMNIQ_HOME is tmp_path/home (commands run in tmp_path)."""
    return clean_env(tmp_path / "home")


def _cwd(env: Mapping[str, str], cwd: str | Path | None) -> Path:
    # Beside the home by default, so ./omniq.yaml of the developer's checkout is never read.
    return Path(cwd) if cwd is not None else Path(env["OMNIQ_HOME"]).parent


def run_omniq(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = 60,
    cwd: str | Path | None = None,
) -> tuple[int, str, str]:
    """Run `omniq ARGS...` to completion: (exit code, stdout, stderr)."""
    if env is None:
        env = clean_env(Path(tempfile.mkdtemp(prefix="omniq-test-")) / "home")
    proc = subprocess.run(
        [*CLI, *args],
        env=dict(env),
        cwd=_cwd(env, cwd),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    return proc.returncode, proc.stdout, proc.stderr


def start_omniq(
    args: Sequence[str],
    env: Mapping[str, str],
    cwd: str | Path | None = None,
    **popen_kwargs: Any,
) -> subprocess.Popen[str]:
    """Start `omniq ARGS...` in the background (the caller waits for or stops it)."""
    popen_kwargs.setdefault("stdout", subprocess.PIPE)
    popen_kwargs.setdefault("stderr", subprocess.PIPE)
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(
        [*CLI, *args], env=dict(env), cwd=_cwd(env, cwd), text=True, **popen_kwargs
    )


def run_burst(env: Mapping[str, str], *extra: str, timeout: float = 60) -> str:
    """`omniq worker --burst`: run what is queued, then exit 0; returns its log (stderr)."""
    code, _, err = run_omniq(["worker", "--burst", *extra], env, timeout=timeout)
    assert code == 0, err
    return err
