"""Result stores: the public names, imported lazily so no driver loads until used."""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "MemoryResultStorage": "omniq.backends.memory",
    "FileResultStorage": "omniq.backends.file",
    "SQLiteResultStorage": "omniq.backends.sqlite",
    "PostgreSQLResultStorage": "omniq.backends.postgres",
    "RedisResultStorage": "omniq.backends.redis",
    "NATSResultStorage": "omniq.backends.nats",
    "ResultStorage": "omniq.storage",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'omniq.results' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
