"""`omniq worker` under systemd: sd_notify datagrams on a socket the test binds; the unit."""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    assert "s3cret-value" not in proc.stdout
    assert any("OMNIQ_RESULT_STORAGE_PASSWORD" in line for line in lines if line.startswith("#"))
    analyze = shutil.which("systemd-analyze")
    if analyze:
        unit = home.path / "omniq-worker.service"
        unit.write_text(proc.stdout)
        check = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
        assert not [line for line in check.stderr.splitlines() if unit.name in line], check.stderr
