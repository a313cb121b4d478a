"""File stores: results and events on any fsspec filesystem, a maildir queue on local disk.

Two designs under one `base_dir` (a local path, or an fsspec URL such as
s3://bucket/prefix for results and events)::

    results/ results-index/ events/ .tmp/   the stores (stores.py, on files.py)
    queue/                                  the queue, local POSIX only (queue.py; its
                                            dead letters by failure time: failed.py)

A `FileBackend` (backend.py) is one place in one process: it owns the filesystem object
and the threads the blocking calls run on, and hands out the three roles. On a local
directory it is a `LocalFileBackend`, which also holds the queue and the fused
operations: submit, claim and finish each do their file operations in one call to the
queue's thread. Object stores have no queue, so no fused operations either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omniq.backend import parse_settings
from omniq.errors import ConfigError
from omniq.registry import Role
from omniq.storage import EventStorage, ResultStorage, TaskQueue

from .backend import FileBackend, LocalFileBackend, backend_at, local_backend_at
from .queue import FileQueue
from .stores import FileEventStorage, FileResultStorage

__all__ = [
    "FileBackend",
    "FileEventStorage",
    "FileQueue",
    "FileResultStorage",
    "FileSettings",
    "LocalFileBackend",
    "backend_at",
    "create",
    "local_backend_at",
]

# Per-store options (the `options` setting): durable = fsync every write (all roles),
# poll_interval = the longest pause between looks for other processes' changes.
_ROLE_OPTIONS = {
    "queue": ("durable", "poll_interval"),
    "results": ("durable",),
    "events": ("durable", "poll_interval"),
}


@dataclass(frozen=True)
class FileSettings:
    """One file store's settings (its config keys without the role prefix)."""

    base_dir: str | None = None
    path: str | None = None  # another name for base_dir
    storage_options: Mapping[str, Any] | None = None  # fsspec's (credentials, endpoint)
    options: Mapping[str, Any] | None = None  # see _ROLE_OPTIONS

    def place(self, role: Role) -> str:
        place = self.base_dir or self.path
        if place is None:
            raise ConfigError(f"the file {role} store needs a directory (setting 'base_dir')")
        return place

    def role_options(self, role: Role) -> dict[str, Any]:
        given = dict(self.options or {})
        known = _ROLE_OPTIONS[role]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown file {role} option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return given


def create(role: Role, settings: Mapping[str, Any]) -> TaskQueue | ResultStorage | EventStorage:
    """An unopened store of `role`, on the process's Backend for its place."""
    parsed = parse_settings(FileSettings, "file", settings)
    place, options = parsed.place(role), parsed.role_options(role)
    if role == "queue":
        if parsed.storage_options:
            raise ConfigError(
                "the file queue takes no storage_options: it runs on a local/NFS path only"
            )
        return FileQueue(place, **options)
    if role == "results":
        return FileResultStorage(place, parsed.storage_options, **options)
    return FileEventStorage(place, parsed.storage_options, **options)
