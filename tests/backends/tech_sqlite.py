"""Conformance plug-in: SQLite, one database file per namespace (shared like two processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NAME = "sqlite"
ROLES = ("queue", "results", "events")


def unavailable() -> str | None:
    return None  # sqlite3 ships with Python


async def make(role: str, tmp_path: Path, namespace: str) -> Any:
    from omniq import registry

    path = tmp_path / "sqlite" / f"{namespace}-{role}.db"
    return registry.create("sqlite", role, {"path": str(path)})  # type: ignore[arg-type]


async def corrupt_task(store: Any, task_id: str, queue: str, payload: bytes) -> None:
    """Overwrite a stored task's payload in place, as an operator's bad write would."""
    import sqlite3

    conn = sqlite3.connect(store.database_path, timeout=10)
    try:
        with conn:
            changed = conn.execute(
                "UPDATE omniq_tasks SET data = ? WHERE id = ? AND queue = ?",
                (payload, task_id, queue),
            ).rowcount
    finally:
        conn.close()
    assert changed == 1, f"task {task_id} is not stored in queue {queue}"


async def make_backend(tmp_path: Path, namespace: str) -> Any:
    """The three roles in one directory: the process's one Backend for those files."""
    from omniq.backends.sqlite import shared_backend

    base = tmp_path / "sqlite"
    return shared_backend({role: str(base / f"{namespace}-{role}.db") for role in ROLES})  # type: ignore[misc]
