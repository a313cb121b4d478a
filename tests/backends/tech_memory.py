"""Conformance plug-in: the in-process memory backend (one shared instance per namespace)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NAME = "memory"
ROLES = ("queue", "results", "events")
_shared: dict[tuple[str, str], Any] = {}


def unavailable() -> str | None:
    return None


async def make(role: str, tmp_path: Path, namespace: str) -> Any:
    from omniq import registry

    key = (role, namespace)
    if key not in _shared:
        _shared[key] = registry.create("memory", role, {})  # type: ignore[arg-type]
    return _shared[key]

# The memory queue keeps Task objects, not bytes: there is nothing to corrupt.
corrupt_task = None


async def make_backend(tmp_path: Path, namespace: str) -> Any:
    """The three roles on one Backend, with its fused operations (one per namespace)."""
    from omniq.backends.memory import MemoryBackend

    key = ("backend", namespace)
    if key not in _shared:
        _shared[key] = MemoryBackend()
    return _shared[key]
