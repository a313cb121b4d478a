"""Conformance plug-in: the file backend on local disk, all three roles under one directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NAME = "file"
ROLES = ("queue", "results", "events")


def unavailable() -> str | None:
    return None  # local files need nothing installed


async def make(role: str, tmp_path: Path, namespace: str) -> Any:
    from omniq import registry

    base = tmp_path / "file" / namespace
    return registry.create("file", role, {"base_dir": str(base)})  # type: ignore[arg-type]


async def corrupt_task(store: Any, task_id: str, queue: str, payload: bytes) -> None:
    """Overwrite a waiting task's file in place, as an operator's bad write would."""
    folder = Path(store.root) / "ready" / queue
    (path,) = folder.glob(f"*~{task_id}~*")  # our ids are plain file names (their own sid)
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(payload)


async def make_backend(tmp_path: Path, namespace: str) -> Any:
    """The three roles on the process's one Backend for the directory, with its fused
    operations."""
    from omniq.backends.file import local_backend_at

    return local_backend_at(tmp_path / "file" / namespace)
