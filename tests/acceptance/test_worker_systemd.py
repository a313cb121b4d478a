"""`omniq worker` under systemd: sd_notify datagrams on a socket the test binds; the unit."""

from __future__ import annotations

import grp
import math
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.conftest import CLI as CLI_ARGS
from tests.acceptance.test_worker_daemon import Home, wait_until


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket (path or abstract '@' name)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + name[1:].encode() if name.startswith("@") else name)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def lines(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return [line for m in self.messages for line in m.split("\n")]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    h = Home(tmp_path)
    yield h
    h.close()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    folder = tempfile.mkdtemp(prefix="oq", dir="/tmp")  # AF_UNIX paths are short
    sock = NotifySocket(os.path.join(folder, "notify"))
    yield sock
    sock.close()
    shutil.rmtree(folder, ignore_errors=True)


def test_ready_status_watchdog_and_stopping(home: Home, notify: NotifySocket) -> None:
    task_id = home.submit("omniq.examples:add", 1, 1)
    env = {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "200000"}  # ping every 0.1s
    worker = home.start_worker(env=env)
    wait_until(lambda: notify.lines().count("WATCHDOG=1") >= 3, what="three watchdog pings")
    lines = notify.lines()
    assert lines[0] == "READY=1"  # first, and only once the stores answered
    assert lines[1].startswith("STATUS=working: ")
    assert lines.count("READY=1") == 1
    wait_until(lambda: home.result(task_id)["status"] == "completed", what="the task")
    worker.send(signal.SIGTERM)
    assert worker.wait() == 0
    lines = notify.lines()
    assert "STOPPING=1" in lines
    assert lines.index("STOPPING=1") > lines.index("READY=1")
    assert any(line.startswith("STATUS=stopping: ") for line in lines)


def test_abstract_socket_names(home: Home) -> None:
    notify = NotifySocket(f"@omniq-test-{uuid.uuid4().hex}")
    try:
        home.burst(env={"NOTIFY_SOCKET": notify.name})
        lines = notify.lines()
    finally:
        notify.close()
    assert lines[0] == "READY=1" and "STOPPING=1" in lines
    assert "WATCHDOG=1" not in lines  # no WATCHDOG_USEC, no pings


def test_no_ready_when_the_stores_cannot_be_reached(home: Home, notify: NotifySocket) -> None:
    pytest.importorskip("redis")
    env = {
        "NOTIFY_SOCKET": notify.name,
        "OMNIQ_TASK_QUEUE_TYPE": "redis",
        "OMNIQ_TASK_QUEUE_URL": "redis://127.0.0.1:1/0",
    }
    assert home.run("worker", env=env).returncode == 69
    assert "READY=1" not in notify.lines()


def test_systemd_unit(home: Home) -> None:
    config = home.path / "omniq.yaml"
    config.write_text("worker:\n  concurrency: 2\n")
    secret = {"OMNIQ_RESULT_STORAGE_PASSWORD": "s3cret-value"}
    proc = home.run(
        "--config",
        "omniq.yaml",
        "worker",
        "--systemd-unit",
        "-q",
        "high",
        "-q",
        "default",
        "--pool",
        "process",
        "--shutdown-timeout",
        "45s",
        env=secret,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    keys = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    assert keys["Type"] == "notify"
    program, *args = keys["ExecStart"].split(" ")
    assert os.path.isabs(program) and os.access(program, os.X_OK)
    command = " ".join(args)
    assert f"--config {config}" in command
    assert "worker -q high -q default --pool process --shutdown-timeout 45" in command
    assert "--systemd-unit" not in command
    assert keys["TimeoutStopSec"] == str(math.ceil(45 + 15))
    assert keys["KillMode"] == "mixed"
    assert keys["Restart"] == "on-failure"
    assert keys["RestartPreventExitStatus"] == "78"
    assert int(keys["WatchdogSec"]) > 0
    assert keys["WorkingDirectory"] == str(home.path)
    assert f"Environment=OMNIQ_HOME={home.path / 'home'}" in lines
    me = pwd.getpwuid(os.geteuid())
    assert keys["User"] == me.pw_name and keys["Group"] == grp.getgrgid(me.pw_gid).gr_name
    assert keys["ReadWritePaths"] == str(home.path / "home")
    assert "s3cret-value" not in proc.stdout
    assert any("OMNIQ_RESULT_STORAGE_PASSWORD" in line for line in lines if line.startswith("#"))
    analyze = shutil.which("systemd-analyze")
    if analyze:
        unit = home.path / "omniq-worker.service"
        unit.write_text(proc.stdout)
        check = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
        assert not [line for line in check.stderr.splitlines() if unit.name in line], check.stderr


def unit_keys(text: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            name, _, value = line.partition("=")
            keys.setdefault(name, []).append(value)
    return keys


def systemd_words(value: str, exec_args: bool = False) -> list[str]:
    """Words of a unit value as systemd reads them (quotes, \\ escapes, %%, and $$ in
    ExecStart arguments)."""
    words = [w.replace("%%", "%") for w in shlex.split(value)]
    if exec_args:
        words = words[:1] + [w.replace("$$", "$") for w in words[1:]]
    return words


def test_unit_reproduces_the_config_file_data_dir_and_user(home: Home) -> None:
    # ./omniq.yaml found by the lookup (no --config given), OMNIQ_HOME not in the shell.
    (home.path / "omniq.yaml").write_text("worker:\n  concurrency: 3\n")
    env = {key: value for key, value in home.env.items() if key != "OMNIQ_HOME"}
    env["HOME"] = str(home.path / "user home")
    proc = subprocess.run(
        [*CLI_ARGS, "worker", "--systemd-unit", "--unit-user", "svc", "--unit-group", "svc"],
        cwd=home.path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    keys = unit_keys(proc.stdout)
    command = systemd_words(keys["ExecStart"][0], exec_args=True)
    assert command[command.index("--config") + 1] == str(home.path / "omniq.yaml")
    environment = dict(w.split("=", 1) for v in keys["Environment"] for w in systemd_words(v))
    data = environment["OMNIQ_HOME"]
    assert data.startswith(str(home.path / "user home"))  # the data dir this shell used
    assert keys["ReadWritePaths"] == [shlex.quote(data).replace("'", '"')]
    assert (keys["User"], keys["Group"]) == (["svc"], ["svc"])
    assert "is not a" not in proc.stderr


def test_the_worker_runs_as_the_unit_says(home: Home, tmp_path: Path) -> None:
    """ExecStart, Environment= and WorkingDirectory= read back with systemd's syntax start a
    worker on the same stores: awkward characters survive the quoting."""
    awkward = tmp_path / "data $dir 100%"
    env = {"OMNIQ_HOME": str(awkward)}
    task_id = home.enqueue("omniq.examples:add", "2", "3")  # on the home's own stores
    proc = home.run("worker", "--burst", "--systemd-unit", "-q", "default")
    assert proc.returncode == 0, proc.stderr
    keys = unit_keys(proc.stdout)
    command = systemd_words(keys["ExecStart"][0], exec_args=True)
    environment = dict(w.split("=", 1) for v in keys["Environment"] for w in systemd_words(v))
    service_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), **environment}
    ran = subprocess.run(
        command, cwd=keys["WorkingDirectory"][0].replace("%%", "%"), env=service_env,
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert home.result(task_id)["value"] == 5
    # The same round trip for values with spaces, $ and %.
    proc = home.run("worker", "--systemd-unit", env=env)
    assert proc.returncode == 0, proc.stderr
    keys = unit_keys(proc.stdout)
    environment = dict(w.split("=", 1) for v in keys["Environment"] for w in systemd_words(v))
    assert environment["OMNIQ_HOME"] == str(awkward)
    assert systemd_words(keys["ReadWritePaths"][0]) == [str(awkward)]
    # The sandbox leaves readable what the worker reads: its interpreter may live in a home.
    python = os.path.realpath(sys.executable)
    in_home = python.startswith(("/home/", "/root/"))
    assert keys["ProtectHome"] == ["read-only" if in_home else "yes"]


def test_burst_units_are_a_oneshot_service_and_a_timer(home: Home) -> None:
    service = home.run("worker", "--burst", "--systemd-unit")
    timer = home.run("worker", "--burst", "--systemd-timer", "--every", "10m")
    assert service.returncode == timer.returncode == 0, service.stderr + timer.stderr
    keys = unit_keys(service.stdout)
    assert keys["Type"] == ["oneshot"] and "Restart" not in keys  # not a poll loop
    assert "--burst" in keys["ExecStart"][0]
    assert unit_keys(timer.stdout)["OnUnitActiveSec"] == ["600s"]
    assert home.run("worker", "--systemd-timer").returncode == 2  # needs --burst
    analyze = shutil.which("systemd-analyze")
    if analyze:
        (home.path / "omniq-worker.service").write_text(service.stdout)
        (home.path / "omniq-worker.timer").write_text(timer.stdout)
        check = subprocess.run(
            [analyze, "verify", "omniq-worker.service", "omniq-worker.timer"],
            cwd=home.path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert check.returncode == 0, check.stderr
        score = subprocess.run(
            [analyze, "security", "--offline=true", "omniq-worker.service"],
            cwd=home.path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert float(score.stdout.rsplit(":", 1)[-1].split()[0]) <= 4.0, score.stdout
