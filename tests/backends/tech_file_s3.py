"""Conformance plug-in: file results and events on S3, served by moto's standalone server.

The server starts lazily, once per test session, on a free port of 127.0.0.1 in a
thread of this process; every namespace is a prefix of one bucket.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

NAME = "file-s3"
ROLES = ("results", "events")
BUCKET = "omniq-conformance"

_lock = threading.Lock()
_endpoint: list[str] = []


def unavailable() -> str | None:
    missing = [name for name in ("moto", "werkzeug", "s3fs") if not importlib.util.find_spec(name)]
    return f"not installed: {', '.join(missing)} (pip install 'omniq[test]')" if missing else None


def storage_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"},
    }


def endpoint() -> str:
    """The moto server's URL, starting it (and making the bucket) on first use."""
    with _lock:
        if not _endpoint:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            atexit.register(server.stop)
            host, port = server.get_host_and_port()
            url = f"http://{host}:{port}"
            _make_bucket(url)
            _endpoint.append(url)
        return _endpoint[0]


def _make_bucket(url: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **storage_options(url))
    with contextlib.suppress(FileExistsError):  # moto keeps buckets per process, not server
        fs.mkdir(BUCKET)


async def make(role: str, tmp_path: Path, namespace: str) -> Any:
    from omniq import registry

    settings = {
        "base_dir": f"s3://{BUCKET}/{namespace}",
        "storage_options": storage_options(endpoint()),
    }
    return registry.create("file", role, settings)  # type: ignore[arg-type]
