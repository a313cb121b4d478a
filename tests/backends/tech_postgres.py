"""Conformance plug-in: PostgreSQL, one schema per namespace on the shared test server.

The server comes from $OMNIQ_TEST_POSTGRES_DSN, else postgresql://postgres@127.0.0.1:5432/test.
Schemas made by the tests are dropped when the test process exits.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import Any

NAME = "postgres"
ROLES = ("queue", "results", "events")
DSN = os.environ.get("OMNIQ_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")

_created: set[str] = set()
_checked: list[str | None] = []


def unavailable() -> str | None:
    if not _checked:
        _checked.append(_probe())
    return _checked[0]


def _probe() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        with psycopg.connect(DSN, connect_timeout=2):
            return None
    except psycopg.Error as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def schema_for(namespace: str) -> str:
    """A schema name for `namespace`, dropped again at exit."""
    name = f"omniq_test_{namespace}"
    if not _created:
        atexit.register(drop_schemas)
    _created.add(name)
    return name


def drop_schemas() -> None:
    names = sorted(_created)
    _created.clear()
    drop_schema(*names)


def drop_schema(*names: str) -> None:
    """Drop schemas of the test server; best effort (the server may be gone)."""
    import psycopg
    from psycopg import sql

    if not names:
        return
    try:
        with psycopg.connect(DSN, connect_timeout=2, autocommit=True) as conn:
            for name in names:
                drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
                conn.execute(drop.format(sql.Identifier(name)))
    except psycopg.Error:
        pass  # the server went away: nothing left to tidy


async def make(role: str, tmp_path: Path, namespace: str) -> Any:
    from omniq import registry

    settings = {"dsn": DSN, "schema": schema_for(namespace)}
    return registry.create("postgres", role, settings)


async def make_backend(tmp_path: Path, namespace: str) -> Any:
    """The three roles on one Backend, with its fused operations: the process's one
    Backend for the namespace's schema."""
    from omniq.backends.postgres import backend_for

    return backend_for({"dsn": DSN, "schema": schema_for(namespace)})


async def corrupt_task(store: Any, task_id: str, queue: str, payload: bytes) -> None:
    """Overwrite a stored task's payload in place, as an operator's bad write would."""
    import psycopg
    from psycopg import sql

    query = sql.SQL("UPDATE {}.tasks SET payload = %s WHERE id = %s AND queue = %s")
    schema = store.backend.place.schema
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        cur = await conn.execute(query.format(sql.Identifier(schema)),
                                 (payload, task_id, queue))
        assert cur.rowcount == 1, f"task {task_id} is not stored in queue {queue}"
