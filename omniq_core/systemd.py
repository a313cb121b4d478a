"""systemd integration with the standard library only: sd_notify, the watchdog, unit files."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass

log = logging.getLogger("omniq.systemd")

# What systemd sets for a Type=notify service; removed from the environment once read so
# that task code, shell tasks and pool children cannot talk to systemd in our name.
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(name: str) -> str | bytes:
    """The AF_UNIX address for a NOTIFY_SOCKET value; '@' names live in the abstract namespace."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def watchdog_interval(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked.

    WATCHDOG_PID, when set, names the process the watchdog is meant for: any other process
    (a child that inherited the environment) must not ping.
    """
    usec = env.get("WATCHDOG_USEC", "").strip()
    if not usec:
        return None
    owner = env.get("WATCHDOG_PID", "").strip()
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000 / 2


class Notifier:
    """Sends sd_notify datagrams; a no-op when the service manager did not ask for them."""

    def __init__(self, address: str | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog if address else None
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read (and remove) NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog = watchdog_interval(env)
        for name in NOTIFY_VARS:
            env.pop(name, None)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """One datagram with `lines` ("READY=1", "STATUS=..."); True when it was sent."""
        if self.address is None or not lines:
            return False
        payload = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A full socket buffer must never stall the event loop: drop the message.
                self._sock.setblocking(False)
            self._sock.sendto(payload, socket_address(self.address))
        except OSError as exc:
            if not self._failed:  # once: a broken socket would otherwise flood the log
                self._failed = True
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def ping(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


# --- unit file ------------------------------------------------------------------------------

STOP_MARGIN = 15.0  # seconds beyond the shutdown timeout to release tasks and close stores
DEFAULT_WATCHDOG_SEC = 30


@dataclass(frozen=True)
class UnitSpec:
    command: tuple[str, ...]  # ExecStart argv, program first
    shutdown_timeout: float
    working_directory: str
    description: str = "OmniQ worker"
    watchdog_sec: int = DEFAULT_WATCHDOG_SEC
    environment: tuple[tuple[str, str], ...] = ()


def quote_arg(arg: str) -> str:
    """One ExecStart word: systemd expands %specifiers and $VARS, so both are escaped."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if text and not any(c.isspace() or c in "\"'\\;" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _env_line(name: str, value: str) -> str:
    return "Environment=" + quote_arg(f"{name}={value}")


def unit_file(spec: UnitSpec) -> str:
    """A ready-to-use Type=notify service unit running `spec.command`."""
    stop = math.ceil(spec.shutdown_timeout + STOP_MARGIN)
    env_lines: Iterable[str] = (_env_line(k, v) for k, v in spec.environment)
    lines = [
        "# Generated by `omniq worker --systemd-unit`. Install it with:",
        "#   sudo cp omniq-worker.service /etc/systemd/system/",
        "#   sudo systemctl daemon-reload && sudo systemctl enable --now omniq-worker",
        "[Unit]",
        f"Description={spec.description}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={' '.join(quote_arg(a) for a in spec.command)}",
        f"WorkingDirectory={quote_arg(spec.working_directory)}",
        "Environment=PYTHONUNBUFFERED=1",
        *env_lines,
        "# Secrets (store passwords) belong in a root-only file, not in this unit:",
        "#EnvironmentFile=/etc/omniq/worker.env",
        "#User=omniq",
        "#Group=omniq",
        f"WatchdogSec={spec.watchdog_sec}",
        # SIGTERM to the worker alone: it drains, its task processes finish or are released;
        # whatever is left after TimeoutStopSec gets SIGKILL, children included.
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={stop}",
        "Restart=on-failure",
        "RestartSec=5",
        # 78 = configuration error: restarting cannot fix it, so do not loop.
        "RestartPreventExitStatus=78",
        "SyslogIdentifier=omniq-worker",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"
