"""The Lua scripts (scripts/*.lua, package data): sources with the shared preludes
and the constants filled in, and their SHA1s for EVALSHA."""

from __future__ import annotations

import hashlib
from importlib import resources

from omniq.models import Task
from omniq.serialization import FORMAT_VERSION, encode_task

# Ready tasks score READY_BASE - priority: below every timer (ms, >= 0) for any
# priority within +-PRIORITY_LIMIT, and exact in a double.
READY_BASE = -(10**15)
PRIORITY_LIMIT = 10**14
# A payload this OmniQ can read starts so (checked before a STARTED is written).
TASK_PREFIX = encode_task(Task(func="m:f")).decode().split(",", 1)[0] + ","
_PRELUDES = ("_prelude.lua", "_result.lua")
NAMES = (
    "enqueue", "claim", "finish", "ack", "retry", "release", "extend", "cancel",
    "stats", "purge", "failed", "forget", "worker_set", "worker_list", "worker_delete",
    "result_store", "result_delete", "result_cleanup",
    "events_append", "events_cleanup", "events_cleanup_legacy", "upgrade",
)


def _read(name: str) -> str:
    return (resources.files(__package__) / "scripts" / name).read_text(encoding="utf-8")


def _build(name: str) -> bytes:
    text = "".join(_read(p) for p in _PRELUDES) + _read(name + ".lua")
    for key, value in (("READY_BASE", str(READY_BASE)),
                       ("FORMAT_VERSION", str(FORMAT_VERSION)),
                       ("TASK_PREFIX", "'" + TASK_PREFIX.replace('"', '\\"') + "'")):
        text = text.replace(key, value)
    return text.encode()


SOURCES: dict[str, bytes] = {name: _build(name) for name in NAMES}
SHAS: dict[str, str] = {name: hashlib.sha1(src).hexdigest() for name, src in SOURCES.items()}
BY_SHA: dict[str, str] = {sha: name for name, sha in SHAS.items()}
