"""Backend name -> factory. Driver modules are imported only when a backend is built.

Each backend module exposes::

    def create(role: Role, settings: Mapping[str, Any]) -> TaskQueue | ResultStorage | EventStorage

where `settings` holds the store's options without their prefix (for
`result_storage_path` the key is `path`), `None` values already dropped.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, Union, overload

from omniq.errors import ConfigError, MissingDependency

if TYPE_CHECKING:
    from omniq.storage import EventStorage, ResultStorage, TaskQueue

Role = Literal["queue", "results", "events"]
Store = Union["TaskQueue", "ResultStorage", "EventStorage"]
ROLES: tuple[Role, ...] = ("queue", "results", "events")

# type name -> (module, pip extra that brings its driver, driver module)
BACKENDS: dict[str, tuple[str, str | None, str | None]] = {
    "memory": ("omniq.backends.memory", None, None),
    "sqlite": ("omniq.backends.sqlite", None, None),
    "file": ("omniq.backends.file", None, "fsspec"),
    "postgres": ("omniq.backends.postgres", "postgres", "psycopg"),
    "redis": ("omniq.backends.redis", "redis", "redis"),
    "nats": ("omniq.backends.nats", "nats", "nats"),
}
ALIASES = {"postgresql": "postgres", "pg": "postgres", "fs": "file", "nats-jetstream": "nats"}


def canonical(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in BACKENDS:
        raise ConfigError(f"unknown backend type {name!r}; choose one of: {', '.join(BACKENDS)}")
    return key


def install_hint(name: str) -> str:
    extra = BACKENDS[canonical(name)][1]
    return f"pip install 'omniq[{extra}]'" if extra else "pip install omniq"


def require(driver: str, extra: str) -> Any:
    """Import an optional driver or raise MissingDependency with the install hint."""
    try:
        return importlib.import_module(driver)
    except ImportError as exc:
        raise MissingDependency(
            f"the {extra} backend needs the '{driver}' package: pip install 'omniq[{extra}]'"
        ) from exc


@overload
def create(kind: str, role: Literal["queue"], settings: Mapping[str, Any]) -> TaskQueue: ...
@overload
def create(kind: str, role: Literal["results"], settings: Mapping[str, Any]) -> ResultStorage: ...
@overload
def create(kind: str, role: Literal["events"], settings: Mapping[str, Any]) -> EventStorage: ...
@overload
def create(kind: str, role: Role, settings: Mapping[str, Any]) -> Store: ...


def create(kind: str, role: Role, settings: Mapping[str, Any]) -> Store:
    """Build (but do not open) the store of `role` on backend `kind`: a role of the
    process's one Backend for those settings (see omniq.backend)."""
    key = canonical(kind)
    module_name, extra, driver = BACKENDS[key]
    if driver is not None:
        require(driver, extra or key)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MissingDependency(
            f"backend {key!r} could not be loaded ({exc}); try: {install_hint(key)}"
        ) from exc
    clean = {k: v for k, v in settings.items() if v is not None}
    store: Store = module.create(role, clean)
    return store
