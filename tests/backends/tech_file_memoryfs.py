"""Conformance plug-in: file results and events on fsspec's memory:// filesystem."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

NAME = "file-memory"
ROLES = ("results", "events")


def unavailable() -> str | None:
    return None if importlib.util.find_spec("fsspec") else "fsspec is not installed"


async def make(role: str, tmp_path: Path, namespace: str) -> Any:
    from omniq import registry

    return registry.create("file", role, {"base_dir": f"memory://{namespace}"})  # type: ignore[arg-type]
