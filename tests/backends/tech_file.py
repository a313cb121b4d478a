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
