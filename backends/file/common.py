"""What the file stores and the file queue share: names, times, local writes, wake-ups and
error translation."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from omniq.errors import BackendError, BackendUnavailable, OmniQError, redact
from omniq.storage import LocalSignal

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
TMP_MAX_AGE = 3600.0  # seconds before a leftover temp file counts as garbage
_DRIVER_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "azure",
                   "google", "fsspec")
_LOCAL_PROTOCOLS = ("file", "local")
RACES = 8  # tries of a create or replace that keeps losing to concurrent changes


# --- names and times ---------------------------------------------------------


def sid_of(key: str) -> str:
    """A file-name-safe form of a task or worker id (hashed when it is not one already)."""
    if _SAFE_NAME.fullmatch(key):
        return key
    return "=" + hashlib.sha256(key.encode()).hexdigest()[:40]


def us(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return max(0, (value - EPOCH) // _US)


def now_us() -> int:
    return time.time_ns() // 1000


def utc(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def local_path(base_dir: str | os.PathLike[str]) -> str | None:
    """The local directory `base_dir` names, or None for any other filesystem."""
    text = os.fspath(base_dir)
    if "://" in text:
        protocol, _, rest = text.partition("://")
        if protocol.lower() not in _LOCAL_PROTOCOLS:  # s3, memory, or a chain a::b
            return None
        text = rest
    return os.path.abspath(os.path.expanduser(text))


# --- local writes ------------------------------------------------------------


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_quiet(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def write_tmp(tmp_dir: str, data: bytes, durable: bool) -> str:
    path = os.path.join(tmp_dir, secrets.token_hex(8))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return path


def rename_into(src: str, dest: str, stop: str, sync: Callable[[str], None]) -> None:
    """Rename `src` to `dest`, making its missing folders below `stop` (each durable in
    its parent when `sync` fsyncs). FileNotFoundError only when `src` is gone: a folder
    pruned between its making and the rename is made again."""
    for _ in range(RACES):
        try:
            os.rename(src, dest)
        except FileNotFoundError:
            if not os.path.lexists(src):
                raise
            with contextlib.suppress(FileNotFoundError):  # a parent pruned meanwhile: again
                _make_folders(os.path.dirname(dest), stop, sync)
            continue
        sync(os.path.dirname(dest))
        return
    raise BackendError(f"file store: could not move a file into {dest}: its folder keeps going")


def _make_folders(path: str, stop: str, sync: Callable[[str], None]) -> None:
    missing: list[str] = []
    while path != stop and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
        sync(os.path.dirname(folder))


def sweep_tmp(tmp_dir: str) -> None:
    """Drop temp files a killed writer left behind (old enough to be nobody's)."""
    cutoff = time.time() - TMP_MAX_AGE
    with contextlib.suppress(FileNotFoundError), os.scandir(tmp_dir) as it:
        for entry in it:
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:  # (a hint's link too)
                    os.unlink(entry.path)


# --- wake-ups and errors -----------------------------------------------------

_signals: dict[str, LocalSignal] = {}
_signals_lock = threading.Lock()


def signal_for(key: str) -> LocalSignal:
    """One signal per location, so every handle in this process wakes together (other
    processes are seen by polling)."""
    with _signals_lock:
        return _signals.setdefault(key, LocalSignal())


def translate(exc: BaseException, where: str) -> OmniQError | None:
    """The omniq error for a filesystem or driver error at `where`; None for others."""
    if not isinstance(exc, OSError | json.JSONDecodeError | UnicodeDecodeError):
        module = type(exc).__module__ or ""
        if module.split(".", 1)[0] not in _DRIVER_MODULES:
            return None
    name = type(exc).__name__
    text = redact(f"file store {where}: {name}: {exc}".splitlines()[0])
    unreachable = ("Connect", "Timeout", "Credentials", "Endpoint", "Auth")
    if isinstance(exc, PermissionError | ConnectionError | TimeoutError) or any(
        word in name for word in unreachable
    ):
        return BackendUnavailable(text)
    return BackendError(text)
