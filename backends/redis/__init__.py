"""Redis for all three roles: one Backend per server+database+prefix, Lua-scripted
leases and fused writes, Pub/Sub result waits, a stream for events.

Key layout (P = the prefix, default "omniq"; several apps can share one Redis with
different prefixes)::

    P:t:<id>            hash   the task's record: d=payload ('' once it left its
                               queue) q=queue p=priority mr=max_retries x=expires
                               (ms) u/ut=unique key and its ttl (ms), then s=state
                               (absent/w queued, r running, f dead letter, d done)
                               a=attempts t=lease token rs=ready since (ms), and its
                               events: e:<event id> = "<stream id> <payload>"; af=1
                               on a task that waits for others (issue 11: claims
                               store no STARTED for it). Once done it lives
                               `event_ttl` more (with its events).
    P:q:<queue>         zset   ready tasks by READY_BASE - priority, then id (ids
                               start with their creation time: FIFO within a
                               priority, across producers as far as their clocks
                               agree); scheduled tasks and leases by due time (ms)
    P:q:<queue>:failed  zset   dead letters by time of failure (ms): what failed()
                               pages, newest first, merging the queues' zsets
    P:queues            set    queue names (added once per queue and process)
    P:u:<unique key>    string the task holding the key; PEXPIRE unique_ttl once
                               it finished (P:unique, a hash, is the layout before
                               issue 8: read and moved lazily)
    P:workers P:workers:ttl    live workers
    P:rec:<kind>        hash   named records beside the queue (issue 11: schedules,
                               their state, cancel requests): name -> data
    P:r:<id>            string result payload, PEXPIREAT = expires_at; the channel
                               of the same name announces a store
    P:ri                zset   results for cleanup: x<id> by expiry, f<id> by minus
                               the finish time (P:ri:expiry, P:ri:finished: before
                               issue 10, drained by cleanup)
    P:e:all             stream every event (entry id = cursor), MAXLEN ~ capped;
                               entries that make a task ready carry w=<queue>
    P:e:old             zset   events stamped long before they were stored, by stamp
    P:wake              stream wake-ups (w=<queue>) of tasks made ready without an
                               event: idle workers block on it and on P:e:all
    P:layout            "2"    (before issue 10: none; upgrade.lua moves queued tasks,
                               P:et:<id> event lists are still read and cleaned)

The prefix is 1-64 of [A-Za-z0-9_.-]: no ':' (so "a" and "a:b" can never collide), no
braces (hash tags), spaces or glob characters (so `SCAN MATCH P:*` finds exactly one
app's keys). Scripts compute the keys they touch from the prefix, so Redis Cluster is
not supported; Redis >= 6.2 is required.

Every write may reach the server although its reply is lost (a dropped connection, a
reply later than the timeout), so every script can be sent twice with one effect: an
enqueue is by task id, a result is created only if absent, an event id is stored once
per task, settlements need the lease token, and a claim carries a client-chosen id
that its store object names again on its next call. redis-py's own re-sending is
switched off: the caller (the worker) retries, and only what is safe to retry.

Settings: url or host/port/db, username, password, prefix, tls, and `options` (or
extra keyword arguments of the store constructors): `socket_timeout` (seconds to wait
for a reply, default 5), `stream_maxlen`, `event_ttl`; anything else is passed to
`redis.asyncio.Redis` (ssl_ca_certs, max_connections, ...) except its retry options.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omniq.backend import parse_settings
from omniq.registry import Role, Store

from .backend import RedisBackend, backend_for
from .connection import RedisSettings
from .queue import RedisQueue
from .scripts import SHAS as _SHAS
from .scripts import SOURCES as _SOURCES
from .stores import RedisEventStorage, RedisResultStorage

__all__ = [
    "_SHAS",
    "_SOURCES",
    "RedisBackend",
    "RedisEventStorage",
    "RedisQueue",
    "RedisResultStorage",
    "RedisSettings",
    "create",
]


def create(role: Role, settings: Mapping[str, Any]) -> Store:
    """The store of `role` on the process's Redis Backend for these settings."""
    backend = backend_for(parse_settings(RedisSettings, "redis", settings))
    if role == "queue":
        return backend.queue()
    if role == "results":
        return backend.results()
    return backend.events()
