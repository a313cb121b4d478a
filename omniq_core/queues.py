"""Task queues: the public names, imported lazily so no driver loads until used."""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "MemoryQueue": "omniq.backends.memory",
    "FileQueue": "omniq.backends.file",
    "SQLiteQueue": "omniq.backends.sqlite",
    "PostgreSQLQueue": "omniq.backends.postgres",
    "RedisQueue": "omniq.backends.redis",
    "NATSQueue": "omniq.backends.nats",
    "TaskQueue": "omniq.storage",
    "Delivery": "omniq.models",
    "QueueStats": "omniq.models",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'omniq.queues' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
