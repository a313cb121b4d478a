"""Conformance plug-in: the Redis backend on 127.0.0.1:6379, one key prefix per namespace."""

from __future__ import annotations

import atexit
import socket
from pathlib import Path
from typing import Any

NAME = "redis"
ROLES = ("queue", "results", "events")
HOST, PORT = "127.0.0.1", 6379
_used: set[str] = set()


def unavailable() -> str | None:
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install 'omniq[redis]')"
    try:
        with socket.create_connection((HOST, PORT), timeout=0.5) as sock:
            sock.settimeout(0.5)
            sock.sendall(b"PING\r\n")
            if not sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                return f"{HOST}:{PORT} does not answer like Redis"
    except OSError as exc:
        return f"no Redis server at {HOST}:{PORT} ({exc})"
    return None


async def make(role: str, tmp_path: Path, namespace: str) -> Any:
    from omniq import registry

    _used.add(namespace)
    return registry.create(
        "redis", role, {"host": HOST, "port": PORT, "prefix": namespace}  # type: ignore[arg-type]
    )


async def make_backend(tmp_path: Path, namespace: str) -> Any:
    """The three roles on the process's Backend for this namespace (its prefix)."""
    from omniq.backends.redis import RedisSettings, backend_for

    _used.add(namespace)
    return backend_for(RedisSettings(host=HOST, port=PORT, prefix=namespace))


@atexit.register
def _drop_namespaces() -> None:
    """Leave the shared server as we found it."""
    if not _used:
        return
    try:
        import redis

        client = redis.Redis(host=HOST, port=PORT, socket_timeout=5)
        for namespace in _used:
            keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i : i + 500])
        client.close()
    except Exception:
        pass  # best effort: the keys are namespaced and harmless


async def corrupt_task(store: Any, task_id: str, queue: str, payload: bytes) -> None:
    """Overwrite a waiting task's stored payload in place, as a bad write by hand would."""
    key = f"{store.prefix}:t:{task_id}"
    assert await store._conn.call("HEXISTS", key, "d"), f"no stored task {task_id}"
    await store._conn.call("HSET", key, "d", payload)
