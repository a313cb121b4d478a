"""systemd integration (sd_notify, watchdog, unit file) and the daemon that uses it."""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from omniq.config import OmniQConfig
from omniq.daemon import Daemon, status_line
from omniq.models import Task
from omniq.systemd import (
    STOP_MARGIN,
    Notifier,
    UnitSpec,
    exec_line,
    protect_home,
    quote_arg,
    quote_word,
    raw_path,
    socket_address,
    timer_file,
    unit_file,
    watchdog_interval,
)
from omniq.worker import settings_from_config


class Listener:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(address))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def read(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def lines(self) -> list[str]:
        return [line for message in self.read() for line in message.split("\n")]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    folder = tempfile.mkdtemp(prefix="oq", dir="/tmp")  # AF_UNIX paths must stay short
    sock = Listener(os.path.join(folder, "notify"))
    yield sock
    sock.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    sock = Listener(f"@omniq-test-{uuid.uuid4().hex}")
    yield sock
    sock.close()


# --- sd_notify ----------------------------------------------------------------------------


def test_socket_address_of_path_and_abstract_names() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@name") == b"\0name"


def test_notifier_sends_datagrams_to_a_path_socket(listener: Listener) -> None:
    notifier = Notifier(listener.address)
    assert notifier.ready("working: 0 running")
    assert notifier.ping()
    notifier.stopping("stopping: 1 running")
    notifier.close()
    assert listener.read() == [
        "READY=1\nSTATUS=working: 0 running",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=stopping: 1 running",
    ]


def test_notifier_reaches_an_abstract_socket(abstract_listener: Listener) -> None:
    notifier = Notifier(abstract_listener.address)
    assert notifier.status("hello\nworld")  # a newline must not start a new field
    notifier.close()
    assert abstract_listener.read() == ["STATUS=hello world"]


def test_notifier_without_socket_does_nothing() -> None:
    notifier = Notifier(None, watchdog=5.0)
    assert not notifier.enabled
    assert notifier.watchdog is None
    assert not notifier.ready("x")


def test_notifier_survives_a_missing_socket(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier("/nonexistent/omniq/notify")
    with caplog.at_level(logging.WARNING, logger="omniq.systemd"):
        assert not notifier.ping()
        assert not notifier.ping()
    assert len(caplog.records) == 1  # said once, not on every ping


def test_from_environ_reads_and_removes_the_variables() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environ(env)
    assert notifier.address == "@x"
    assert notifier.watchdog == 2.0
    assert env == {}


def test_watchdog_interval_is_half_and_only_for_its_process() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "abc"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert watchdog_interval(env, pid=2) is None
    assert watchdog_interval(env, pid=1) == 0.5


# --- unit file ------------------------------------------------------------------------------


def test_quote_arg_escapes_what_systemd_would_expand() -> None:
    assert quote_arg("/usr/bin/omniq") == "/usr/bin/omniq"
    assert quote_arg("a b") == '"a b"'
    assert quote_arg("100%") == "100%%"
    assert quote_arg("$HOME") == "$$HOME"
    assert quote_arg('say "hi"') == '"say \\"hi\\""'
    assert quote_arg("") == '""'


def make_unit(timeout: float = 30.0) -> str:
    return unit_file(
        UnitSpec(
            command=(sys.executable, "-m", "omniq.cli", "worker", "-q", "my queue"),
            shutdown_timeout=timeout,
            working_directory="/srv/app",
            environment=(("OMNIQ_HOME", "/var/lib/omniq"),),
        )
    )


def test_unit_file_is_a_notify_service_with_safe_restarts() -> None:
    text = make_unit(45.5)
    lines = text.splitlines()
    assert "Type=notify" in lines
    assert f'ExecStart={sys.executable} -m omniq.cli worker -q "my queue"' in lines
    assert "WorkingDirectory=/srv/app" in lines
    assert "Environment=OMNIQ_HOME=/var/lib/omniq" in lines
    assert any(line.startswith("WatchdogSec=") for line in lines)
    assert "KillMode=mixed" in lines
    assert f"TimeoutStopSec={math.ceil(45.5 + STOP_MARGIN)}" in lines
    assert "Restart=on-failure" in lines
    assert "RestartPreventExitStatus=78" in lines
    assert "WantedBy=multi-user.target" in lines


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (.ci/run installs it)")
        pytest.skip("systemd-analyze is not installed")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def verify(*units: Path) -> None:
    proc = analyze("verify", *map(str, units))
    problems = [line for line in proc.stderr.splitlines() if any(u.name in line for u in units)]
    assert proc.returncode == 0 and not problems, proc.stderr


def exposure(unit: Path) -> float:
    """`systemd-analyze security --offline=true`: the unit's overall exposure, 0 to 10."""
    proc = analyze("security", "--offline=true", "--no-pager", str(unit))
    last = [line for line in proc.stdout.splitlines() if "Overall exposure level" in line]
    assert last, proc.stdout + proc.stderr
    return float(last[-1].split(":")[-1].split()[0])


def test_unit_file_passes_systemd_analyze(tmp_path: Path) -> None:
    unit = tmp_path / "omniq-worker.service"
    unit.write_text(make_unit().replace("/srv/app", str(tmp_path)))
    verify(unit)


def test_each_directive_is_quoted_its_own_way() -> None:
    # ExecStart: $ is expanded in arguments (so $$), not in the program's path.
    assert exec_line(["/opt/a $b/omniq", "$HOME", "50%"]) == '"/opt/a $b/omniq" $$HOME 50%%'
    # Environment=/ReadWritePaths=: quoted words, specifiers escaped, $ as it is.
    assert quote_word("OMNIQ_HOME=/srv/$x") == "OMNIQ_HOME=/srv/$x"
    assert quote_word("A=b c") == '"A=b c"'
    assert quote_word('A=say "hi" \\ 100%') == '"A=say \\"hi\\" \\\\ 100%%"'
    # WorkingDirectory=: never quoted (a quoted path is "not absolute"), $ as it is.
    assert raw_path("/a b/$x%") == "/a b/$x%%"
    with pytest.raises(ValueError, match="absolute"):
        raw_path("relative/dir")
    with pytest.raises(ValueError, match="newline"):
        quote_word("A=two\nlines")


def test_awkward_paths_and_values_pass_verify(tmp_path: Path) -> None:
    # Before: WorkingDirectory="/a b" (not absolute for systemd) and $$ where no $ expands.
    folder = tmp_path / "work dir $x 100%"
    program = folder / "bin $y" / "omniq"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    text = unit_file(
        UnitSpec(
            command=(str(program), "worker", "-q", "a b"),
            shutdown_timeout=30,
            working_directory=str(folder),
            environment=(("OMNIQ_HOME", str(folder / "data")), ("OMNIQ_X", 'q"u\\o$te %')),
            user="omniq",
            group="omniq",
            writable=(str(folder / "data"),),
        )
    )
    lines = text.splitlines()
    assert f"WorkingDirectory={folder}".replace("%", "%%") in lines
    assert f'Environment="OMNIQ_HOME={folder}/data"'.replace("%", "%%") in lines
    assert 'Environment="OMNIQ_X=q\\"u\\\\o$te %%"' in lines
    assert f'ReadWritePaths="{folder}/data"'.replace("%", "%%") in lines
    unit = tmp_path / "omniq-worker.service"
    unit.write_text(text)
    verify(unit)  # also checks that ExecStart's program path resolves to the file


def hardened(tmp_path: Path, data: str, oneshot: bool = False) -> Path:
    unit = tmp_path / "omniq-worker.service"
    unit.write_text(
        unit_file(
            UnitSpec(
                command=("/usr/bin/python3", "-m", "omniq.cli", "worker"),
                shutdown_timeout=30,
                working_directory="/",
                environment=(("OMNIQ_HOME", data),),
                user="omniq",
                group="omniq",
                writable=(data,),
                readable=("/usr/lib/python3",),
                oneshot=oneshot,
            )
        )
    )
    return unit


@pytest.mark.parametrize("data", ["/var/lib/omniq", "/home/alice/.local/share/omniq"])
def test_hardened_unit_scores_4_or_lower(tmp_path: Path, data: str) -> None:
    unit = hardened(tmp_path, data)
    text = unit.read_text()
    for directive in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateDevices=yes",
                      "ProtectKernelTunables=yes", "ProtectControlGroups=yes",
                      "RestrictSUIDSGID=yes", "LockPersonality=yes", "UMask=0077",
                      f"ReadWritePaths={data}", "PrivateTmp=yes"):  # fmt: skip
        assert directive in text.splitlines(), directive
    verify(unit)
    assert exposure(unit) <= 4.0  # was 9.6 UNSAFE
    # Home directories stay readable (venvs, configs) when the worker's files live there.
    expected = "read-only" if data.startswith("/home") else "yes"
    assert f"ProtectHome={expected}" in text.splitlines()


def test_protect_home_and_private_tmp_follow_the_paths_the_worker_needs() -> None:
    assert protect_home(["/srv/app", "/usr/lib/python3"]) == "yes"
    assert protect_home(["/srv/app", "/root/.pyenv/versions/3.11/bin/python"]) == "read-only"
    assert protect_home(["/homer"]) == "yes"
    text = unit_file(
        UnitSpec(command=("/bin/true",), shutdown_timeout=1, working_directory="/tmp/app")
    )
    assert "PrivateTmp=no" in text.splitlines()  # /tmp/app must stay the real one


def test_burst_worker_is_a_oneshot_service_and_a_timer(tmp_path: Path) -> None:
    unit = hardened(tmp_path, "/var/lib/omniq", oneshot=True)
    lines = unit.read_text().splitlines()
    assert "Type=oneshot" in lines and "TimeoutStartSec=infinity" in lines
    assert not [line for line in lines if line.startswith(("Restart=", "WatchdogSec="))]
    timer = tmp_path / "omniq-worker.timer"
    timer.write_text(timer_file(600))
    assert "OnUnitActiveSec=600s" in timer.read_text().splitlines()
    assert "Unit=omniq-worker.service" in timer.read_text().splitlines()
    verify(unit, timer)
    assert exposure(unit) <= 4.0


# --- the daemon on memory stores ------------------------------------------------------------


def memory_config(**values: object) -> OmniQConfig:
    return OmniQConfig.from_values(
        task_queue_type="memory",
        result_storage_type="memory",
        event_storage_type="memory",
        worker_poll_interval=0.05,
        **values,
    )


async def until(check: Callable[[], bool], limit: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def run_daemon(
    listener: Listener | None,
    body: Callable[[Daemon, asyncio.Task[int]], Awaitable[None]],
    watchdog: float | None = None,
    **settings: object,
) -> int:
    config = memory_config()
    notifier = Notifier(listener.address if listener else None, watchdog=watchdog)
    daemon = Daemon(config, settings_from_config(config, **settings), notifier=notifier)

    async def main() -> int:
        running = asyncio.create_task(daemon.run())
        await body(daemon, running)
        return await asyncio.wait_for(running, 20)

    return asyncio.run(main())


def test_daemon_notifies_ready_watchdog_and_stopping(listener: Listener) -> None:
    before = signal.getsignal(signal.SIGTERM)

    async def body(daemon: Daemon, running: asyncio.Task[int]) -> None:
        await until(lambda: listener.lines().count("WATCHDOG=1") >= 3)
        os.kill(os.getpid(), signal.SIGTERM)

    assert run_daemon(listener, body, watchdog=0.02) == 0
    lines = listener.lines()
    assert lines[0] == "READY=1"
    assert lines[1].startswith("STATUS=working: 0 running, 0 done")
    assert "STOPPING=1" in lines
    assert lines.index("STOPPING=1") > lines.index("WATCHDOG=1")
    assert signal.getsignal(signal.SIGTERM) is before  # handlers put back


def start_daemon(listener: Listener, config: OmniQConfig, **kwargs: object) -> Daemon:
    return Daemon(
        config, settings_from_config(config), notifier=Notifier(listener.address), **kwargs
    )


def test_daemon_sends_status_updates(listener: Listener) -> None:
    async def main() -> int:
        daemon = start_daemon(listener, memory_config(), status_every=0.05)
        running = asyncio.create_task(daemon.run())
        await until(lambda: "READY=1" in listener.lines())
        assert daemon.client is not None  # memory stores: enqueue through the daemon's own
        await daemon.client.enqueue("omniq.examples:add", 1, 2)
        await until(lambda: any("1 done" in line for line in listener.lines()))
        os.kill(os.getpid(), signal.SIGINT)
        return await asyncio.wait_for(running, 20)

    assert asyncio.run(main()) == 0


def test_second_signal_forces_exit_and_releases(
    listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> tuple[int, Task | None]:
        daemon = start_daemon(listener, memory_config(worker_shutdown_timeout=60))
        running = asyncio.create_task(daemon.run())
        await until(lambda: "READY=1" in listener.lines())
        assert daemon.client is not None and daemon.worker is not None
        worker = daemon.worker
        task_id = await daemon.client.enqueue("omniq.examples:async_sleep", 30)
        await until(lambda: task_id in worker.running)
        os.kill(os.getpid(), signal.SIGINT)
        await until(lambda: "send again to force" in caplog.text)
        assert not running.done()
        assert status_line(worker).startswith("stopping: 1 running")
        os.kill(os.getpid(), signal.SIGINT)
        code = await asyncio.wait_for(running, 20)
        return code, await worker.queue.get_task(task_id)  # memory: readable after close

    with caplog.at_level(logging.INFO):
        code, task = asyncio.run(main())
    assert code == 128 + signal.SIGINT
    assert isinstance(task, Task)  # handed back, not lost
    assert "shutting down (1 running; send again to force)" in caplog.text
    assert "STOPPING=1" in listener.lines()


def test_daemon_in_burst_mode_exits_zero_without_signals(listener: Listener) -> None:
    async def body(daemon: Daemon, running: asyncio.Task[int]) -> None:
        return None

    assert run_daemon(listener, body, burst=True) == 0
    lines = listener.lines()
    assert "READY=1" in lines and "STOPPING=1" in lines


# --- logs: journald, terminals, JSON --------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def emit(stream: io.StringIO, fmt: str = "text", **extra: object) -> str:
    from omniq.logsetup import make_handler

    handler = make_handler(fmt, stream)
    logger = logging.getLogger("omniq.test-logsetup")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("task %s failed", "abc", extra=extra or None)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_text_logs_have_colour_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert "\x1b[" not in emit(io.StringIO())
    assert "\x1b[33mWARNING" in emit(FakeTerminal())
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[" not in emit(FakeTerminal())


def test_text_logs_to_journald_carry_the_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniq.logsetup import make_handler

    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        handler = make_handler("text", stream)
        record = logging.LogRecord("omniq.worker", logging.WARNING, "", 0, "lost %s", ("x",), None)
        assert handler.format(record) == "<4>omniq.worker: lost x"  # journald adds the time


def test_json_logs_keep_extra_fields() -> None:
    import json

    line = emit(io.StringIO(), "json", task_id="abc")
    record = json.loads(line)
    assert record["message"] == "task abc failed"
    assert record["level"] == "WARNING" and record["task_id"] == "abc"


def test_setup_logging_can_be_undone() -> None:
    from omniq.logsetup import setup_logging

    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    undo = setup_logging("debug", "json", io.StringIO())
    assert root.level == logging.DEBUG and len(root.handlers) == 1
    undo()
    assert (root.handlers, root.level) == before
    with pytest.raises(ValueError):
        setup_logging("LOUD")
