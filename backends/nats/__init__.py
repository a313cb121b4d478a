"""NATS JetStream stores: tasks in a work-queue stream, state and results in KV, events in a stream.

Layout for prefix P (all created on first use, idempotently):

- stream ``P_tasks`` (work-queue retention), subject ``P.tasks.<queue>.<priority>``,
  and the KV bucket ``P_queue`` holding each task's state: the queue (queue.py);
- stream ``P_failed``: a failure record per dead letter, ``P.failed.<queue>.<task id>``,
  read newest first by `failed()` (deadletters.py);
- KV bucket ``P_records``: named records beside the queue, ``<kind>.<name>`` (records.py);
- KV bucket ``P_results``: one key per task; ``wait`` is pushed by a subscription on
  the key's subject (stores.py);
- stream ``P_events``: subject ``P.events.<task id>``; the cursor is the stream
  sequence (stores.py).

One `NATSBackend` (backend.py) per servers, credentials and prefix in a process owns
the one connection (connection.py) that its three roles share, and does the fused
submit, claim and finish on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omniq.backend import parse_settings
from omniq.registry import Role
from omniq.storage import EventStorage, ResultStorage, TaskQueue

from .backend import NATSBackend, NATSSettings, backend_for
from .connection import REQUEST_TIMEOUT
from .queue import ACK_WAIT, NATSQueue, task_key
from .stores import EVENT_DEDUPE_WINDOW, NATSEventStorage, NATSResultStorage

__all__ = [
    "ACK_WAIT",
    "EVENT_DEDUPE_WINDOW",
    "REQUEST_TIMEOUT",
    "NATSBackend",
    "NATSEventStorage",
    "NATSQueue",
    "NATSResultStorage",
    "NATSSettings",
    "backend_for",
    "create",
    "task_key",
]


def create(role: Role, settings: Mapping[str, Any]) -> TaskQueue | ResultStorage | EventStorage:
    """The store of `role` on the process's Backend for these settings."""
    backend = backend_for(parse_settings(NATSSettings, "nats", settings))
    if role == "queue":
        return backend.queue()
    if role == "results":
        return backend.results()
    return backend.events()
