"""Conformance plug-in: NATS JetStream on 127.0.0.1:4222, one stream/bucket prefix per namespace."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import socket
from pathlib import Path
from typing import Any

NAME = "nats"
ROLES = ("queue", "results", "events")
SERVER = "nats://127.0.0.1:4222"
_prefixes: set[str] = set()


def unavailable() -> str | None:
    try:
        import nats  # noqa: F401
    except ImportError:
        return "the nats-py package is not installed"
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=0.5):
            return None
    except OSError as exc:
        return f"no NATS server on 127.0.0.1:4222 ({exc})"


async def make(role: str, tmp_path: Path, namespace: str) -> Any:
    from omniq import registry

    prefix = f"ct_{namespace}"
    _prefixes.add(prefix)
    return registry.create("nats", role, {"servers": [SERVER], "prefix": prefix})  # type: ignore[arg-type]


async def make_backend(tmp_path: Path, namespace: str) -> Any:
    """The three roles on the process's one Backend for this prefix, with its fused ops."""
    from omniq.backends.nats import NATSSettings, backend_for

    prefix = f"ct_{namespace}"
    _prefixes.add(prefix)
    return backend_for(NATSSettings(servers=[SERVER], prefix=prefix))


async def corrupt_task(store: Any, task_id: str, queue: str, payload: bytes) -> None:
    """Overwrite a waiting task's stored payload in place, as an operator's `nats kv put`
    would: the state entry (the truth) changes, its headers and the message stay."""
    from omniq.backends import nats as nats_backend

    key = nats_backend.task_key(task_id)
    entry = await store._state.get(key)
    assert entry is not None and entry.text("Omniq-State") == "waiting", entry
    headers = {k: v for k, v in entry.headers.items() if k.startswith("Omniq-")}
    assert await store._state.put(key, payload, headers, last=entry.rev) is not None


async def _delete_all(prefixes: set[str]) -> None:
    import nats

    nc = await nats.connect(SERVER, connect_timeout=1, max_reconnect_attempts=1)
    try:
        js = nc.jetstream()
        names = [s.config.name for s in await js.streams_info()]
        for name in names:
            if any(name.startswith((p + "_", f"KV_{p}_")) for p in prefixes):
                await js.delete_stream(name)
    finally:
        await nc.close()


@atexit.register
def _cleanup() -> None:
    # Streams and buckets of this run's namespaces go when the test process ends.
    if _prefixes and unavailable() is None:
        with contextlib.suppress(Exception):
            asyncio.run(_delete_all(set(_prefixes)))
