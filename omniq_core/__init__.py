"""OmniQ: run Python callables as background tasks over pluggable stores."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AsyncOmniQ",
    "EventType",
    "OmniQ",
    "OmniQConfig",
    "Task",
    "TaskEvent",
    "TaskOptions",
    "TaskResult",
    "TaskStatus",
    "__version__",
    "current_task",
]

if TYPE_CHECKING:
    from omniq.client import AsyncOmniQ, OmniQ, TaskOptions
    from omniq.config import OmniQConfig
    from omniq.context import current_task
    from omniq.models import EventType, Task, TaskEvent, TaskResult, TaskStatus

_LAZY = {
    "AsyncOmniQ": "omniq.client",
    "OmniQ": "omniq.client",
    "TaskOptions": "omniq.client",
    "OmniQConfig": "omniq.config",
    "EventType": "omniq.models",
    "Task": "omniq.models",
    "TaskEvent": "omniq.models",
    "TaskResult": "omniq.models",
    "TaskStatus": "omniq.models",
    "current_task": "omniq.context",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `omniq --help` and `import omniq` stay fast.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'omniq' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
