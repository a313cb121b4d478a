"""Event stores: the public names, imported lazily so no driver loads until used."""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "MemoryEventStorage": "omniq.backends.memory",
    "FileEventStorage": "omniq.backends.file",
    "SQLiteEventStorage": "omniq.backends.sqlite",
    "PostgreSQLEventStorage": "omniq.backends.postgres",
    "RedisEventStorage": "omniq.backends.redis",
    "NATSEventStorage": "omniq.backends.nats",
    "EventStorage": "omniq.storage",
    "TaskEvent": "omniq.models",
    "EventType": "omniq.models",
    "EventFilter": "omniq.models",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'omniq.events' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
