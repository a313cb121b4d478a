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
