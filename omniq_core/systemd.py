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


# --- unit files -----------------------------------------------------------------------------
# Each directive has its own syntax (systemd.syntax(7), systemd.exec(5), systemd.service(5)):
# - ExecStart= is a command line: words may be quoted ("..." with \\ and \" escapes),
#   %specifiers are expanded everywhere (% is written %%), $VARIABLES in the arguments but
#   not in the program's path ($ is written $$ in arguments only; measured with verify).
# - Environment= and ReadWritePaths= are lists of words, quoted the same way; specifiers are
#   expanded (%%) but $ means nothing there, so it is written as it is.
# - WorkingDirectory= is one raw absolute path: no quotes (a quoted one is "not absolute"),
#   only %% for specifiers.
# - Description=, User=, Group= are raw strings with specifiers expanded.

STOP_MARGIN = 15.0  # seconds beyond the shutdown timeout to release tasks and close stores
DEFAULT_WATCHDOG_SEC = 30
UNIT_NAME = "omniq-worker"

# Hardening that every worker keeps working under (measured: `systemd-analyze security
# --offline=true` rates the generated unit about 2, "OK"; it was 9.6 UNSAFE). What the worker
# itself needs stays allowed: its data dir (ReadWritePaths), reading its venv and config,
# AF_INET/AF_INET6 for server backends, AF_UNIX for sd_notify and local sockets, fork/exec for
# --pool process and shell tasks. Left out on purpose: MemoryDenyWriteExecute (ctypes/cffi
# callbacks in task code need W+X pages), PrivateNetwork/IPAddressDeny (tasks and backends
# talk to servers), PrivateUsers (files the worker writes must belong to User=).
HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "PrivateMounts=yes",
    "PrivateDevices=yes",
    "DevicePolicy=closed",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "ProtectProc=invisible",
    "ProcSubset=pid",
    "RestrictSUIDSGID=yes",
    "RestrictRealtime=yes",
    "RestrictNamespaces=yes",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    "LockPersonality=yes",
    "RemoveIPC=yes",
    "KeyringMode=private",
    "CapabilityBoundingSet=",
    "AmbientCapabilities=",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "SystemCallFilter=~@privileged @resources",
    "SystemCallErrorNumber=EPERM",
    "UMask=0077",
)
# Where ProtectHome= hides files: a worker whose files live there gets read-only instead.
HOME_DIRS = ("/home", "/root", "/run/user")
# What PrivateTmp= replaces: a worker whose files live there keeps the shared ones.
TMP_DIRS = ("/tmp", "/var/tmp")


@dataclass(frozen=True)
class UnitSpec:
    command: tuple[str, ...]  # ExecStart argv, program first
    shutdown_timeout: float
    working_directory: str
    description: str = "OmniQ worker"
    watchdog_sec: int = DEFAULT_WATCHDOG_SEC
    environment: tuple[tuple[str, str], ...] = ()
    user: str | None = None
    group: str | None = None
    writable: tuple[str, ...] = ()  # ReadWritePaths: the data dir, local store dirs
    readable: tuple[str, ...] = ()  # must stay readable: venv, config file, working dir
    oneshot: bool = False  # a burst worker, started by a timer
    restart: str = "on-failure"  # "always" for a worker that exits 0 by design (--max-tasks)


def _specifiers(text: str) -> str:
    return text.replace("%", "%%")


def _check_line(text: str) -> str:
    if "\n" in text or "\r" in text or "\0" in text:
        raise ValueError(f"{text!r} cannot be written in a unit file (newline or NUL)")
    return text


def quote_word(text: str) -> str:
    """One word of Environment= or ReadWritePaths=: quoted when needed, %% for specifiers."""
    text = _specifiers(_check_line(text))
    if text and not any(c.isspace() or c in "\"'\\;" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_arg(arg: str) -> str:
    """One ExecStart argument: systemd expands %specifiers and $VARS there: both escaped."""
    return quote_word(arg.replace("$", "$$"))


def exec_line(argv: Iterable[str]) -> str:
    """ExecStart= value: the program's path (no $ expansion there), then its arguments."""
    program, *args = argv
    return " ".join([quote_word(program), *(quote_arg(a) for a in args)])


def raw_path(path: str) -> str:
    """WorkingDirectory=: an absolute path as it is (never quoted), %% for specifiers."""
    if not os.path.isabs(path):
        raise ValueError(f"{path!r} is not an absolute path")
    return _specifiers(_check_line(path))


def _inside(paths: Iterable[str], tops: Iterable[str]) -> bool:
    return any(path == top or path.startswith(top + "/") for path in paths for top in tops)


def protect_home(paths: Iterable[str]) -> str:
    """ProtectHome=yes unless a path the worker needs lies in a home directory."""
    # read-only: readable; the data dir inside is made writable again by ReadWritePaths.
    return "read-only" if _inside(paths, HOME_DIRS) else "yes"


def private_tmp(paths: Iterable[str]) -> str:
    """PrivateTmp=yes unless a path the worker needs lies in /tmp or /var/tmp."""
    return "no" if _inside(paths, TMP_DIRS) else "yes"


def _env_line(name: str, value: str) -> str:
    return "Environment=" + quote_word(f"{name}={value}")


def unit_file(spec: UnitSpec) -> str:
    """A ready-to-use service unit running `spec.command` under the hardening above."""
    head = [
        "# Generated by `omniq worker --systemd-unit`. Install it with:",
        f"#   sudo cp {UNIT_NAME}.service /etc/systemd/system/",
    ]
    if spec.oneshot:
        head += [
            f"#   omniq worker --burst --systemd-timer > {UNIT_NAME}.timer  (and copy it too)",
            f"#   sudo systemctl daemon-reload && sudo systemctl enable --now {UNIT_NAME}.timer",
        ]
    else:
        head.append(
            f"#   sudo systemctl daemon-reload && sudo systemctl enable --now {UNIT_NAME}"
        )
    lines = [
        *head,
        "[Unit]",
        f"Description={_specifiers(_check_line(spec.description))}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        *_service_type(spec),
        f"ExecStart={exec_line(spec.command)}",
        f"WorkingDirectory={raw_path(spec.working_directory)}",
        *_identity(spec),
        "Environment=PYTHONUNBUFFERED=1",
        *(_env_line(k, v) for k, v in spec.environment),
        "# Secrets (store passwords) belong in a root-only file, not in this unit:",
        "#EnvironmentFile=/etc/omniq/worker.env",
        # SIGTERM to the worker alone: it drains, its task processes finish or are released;
        # whatever is left after TimeoutStopSec gets SIGKILL, children included.
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={math.ceil(spec.shutdown_timeout + STOP_MARGIN)}",
        "SyslogIdentifier=omniq-worker",
        *_sandbox(spec),
    ]
    if not spec.oneshot:
        lines += ["", "[Install]", "WantedBy=multi-user.target"]
    return "\n".join(lines) + "\n"


def _service_type(spec: UnitSpec) -> list[str]:
    if spec.oneshot:
        # One burst per timer tick: no restart loop; a long queue may take its time.
        return ["Type=oneshot", "TimeoutStartSec=infinity"]
    return [
        "Type=notify",
        "NotifyAccess=main",
        f"WatchdogSec={spec.watchdog_sec}",
        f"Restart={spec.restart}",
        "RestartSec=5",
        # 78 = configuration error: restarting cannot fix it, so do not loop.
        "RestartPreventExitStatus=78",
    ]


def _identity(spec: UnitSpec) -> list[str]:
    lines = []
    if spec.user:
        lines.append(f"User={_specifiers(_check_line(spec.user))}")
    if spec.group:
        lines.append(f"Group={_specifiers(_check_line(spec.group))}")
    return lines


def _sandbox(spec: UnitSpec) -> list[str]:
    needed = (*spec.writable, *spec.readable, spec.working_directory)
    lines = ["# Hardening: read-only system, private /tmp and devices; the data dir writable."]
    lines += HARDENING
    lines.append(f"ProtectHome={protect_home(needed)}")
    lines.append(f"PrivateTmp={private_tmp(needed)}")
    if spec.writable:
        lines.append("ReadWritePaths=" + " ".join(quote_word(p) for p in spec.writable))
    return lines


def timer_file(every: float, description: str = "OmniQ burst worker") -> str:
    """The .timer that starts the oneshot burst service every `every` seconds."""
    seconds = max(1, math.ceil(every))
    return "\n".join(
        [
            "# Generated by `omniq worker --burst --systemd-timer`: every "
            f"{seconds}s it starts",
            f"# {UNIT_NAME}.service (from `omniq worker --burst --systemd-unit`).",
            "#   sudo systemctl daemon-reload && sudo systemctl enable --now "
            f"{UNIT_NAME}.timer",
            "[Unit]",
            f"Description={_specifiers(_check_line(description))} every {seconds}s",
            "",
            "[Timer]",
            # From boot, then `every` after each start; a run still going is not started twice.
            f"OnBootSec={seconds}s",
            f"OnUnitActiveSec={seconds}s",
            "AccuracySec=1s",
            f"Unit={UNIT_NAME}.service",
            "",
            "[Install]",
            "WantedBy=timers.target",
        ]
    ) + "\n"
