"""Redis stores for all three roles: Lua-scripted leases, Pub/Sub result waits, Streams for events.

Key layout (P = the prefix, default "omniq"; several apps can share one Redis
with different prefixes)::

    P:t:<id>            hash   task: d=payload q=queue p=priority a=attempts
                               s=state (w waiting, s scheduled, r running,
                               f failed) m=ready member t=lease token
                               u=unique key ut=unique_ttl (ms)
    P:q:<queue>:ready   zset   score -priority, member <16-hex seq><id> (FIFO)
    P:q:<queue>:delayed zset   task ids by ETA / retry time (ms)
    P:q:<queue>:leases  zset   task ids by lease deadline (ms)
    P:q:<queue>:failed  zset   dead letters by time of failure
    P:q:<queue>:wake    list   wake-up tokens for blocked dequeues (BLPOP)
    P:c:<claim id>      string the task a claim took, for a lease's time (a claim
                               whose reply was lost is found again by its id)
    P:u:<unique key>    string the task holding the key; PEXPIRE unique_ttl once
                               it finished (P:unique, a hash of key -> id, is
                               the layout before issue 8: read and moved lazily)
    P:queues P:seq P:workers P:workers:ttl
    P:r:<id>            string result payload, PEXPIREAT = expires_at;
                               channel of the same name announces a store
    P:ri:expiry P:ri:finished  zsets of result ids for cleanup
    P:e:all             stream every event (entry id = cursor), MAXLEN ~ capped
    P:et:<id>           list   "<ts_ms> <entry id> <payload>" per task, with a TTL
    P:e:index           zset   task ids by their oldest event time (for cleanup)
    P:e:seen            zset   task ids by their last append (drops expired lists)

The prefix is 1-64 of [A-Za-z0-9_.-]: no ':' (so "a" and "a:b" can never
collide), no braces (hash tags), spaces or glob characters (so `SCAN MATCH P:*`
finds exactly one app's keys). Scripts compute the keys they touch from the
prefix, so Redis Cluster is not supported; Redis >= 6.2 is required.

Every write may reach the server although its reply is lost (a dropped connection,
a reply later than the timeout), so every script can be sent twice with one effect:
enqueue is by task id, a result is created only if absent, an event id is stored
once per task, settlements need the lease token, and a claim carries a client-chosen
id its store object asks for again. redis-py's own re-sending is switched off: the
caller (the worker) retries, and only what is safe to retry.

Options (the `options` setting or extra keyword arguments): `socket_timeout`
(seconds to wait for a reply, default 5), `stream_maxlen` and `event_ttl` (event
store), anything else is passed to `redis.asyncio.Redis` (ssl_ca_certs,
max_connections, ...) but its retry options, refused. A store belongs to one event
loop at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from omniq.errors import BackendError, BackendUnavailable, ConfigError, OmniQError, redact
from omniq.models import (
    Delivery,
    QueueStats,
    Task,
    TaskEvent,
    TaskResult,
    WorkerInfo,
    check_queue_name,
)
from omniq.registry import Role
from omniq.serialization import (
    decode_event,
    decode_result,
    decode_task_or_placeholder,
    decode_worker,
    dumps,
    encode_event,
    encode_result,
    encode_task,
    encode_worker,
)

PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CURSOR_RE = re.compile(r"^\d+-\d+$")
DEFAULT_STREAM_MAXLEN = 1_000_000
DEFAULT_EVENT_TTL = 30 * 86400.0  # safety net; cleanup(before) is the real retention
BATCH = 500  # items one cleanup/purge script call handles, so Redis is never blocked long
WAKE_TOKENS = 1000  # cap of a queue's wake list when nobody is waiting
RESULT_SLICE = 5.0  # a result waiter re-reads at least this often (missed notifications)
BLOCK_SLICE = 2.0  # longest single BLPOP / XREAD BLOCK; waits longer than that loop
# Claim ids of failed calls that one claim call asks about. A call delivers one task,
# so concurrent calls (a worker's fetchers) each take one: three claims lost in one
# pipelined request are found by the next three calls, not one after another.
UNSETTLED_PER_CALL = 1
UNSETTLED_MAX = 256  # kept at most (the oldest go: their leases expire anyway)
_UNAVAILABLE = (
    rexc.ConnectionError,  # includes AuthenticationError and BusyLoadingError
    rexc.TimeoutError,
    rexc.NoPermissionError,
    rexc.ReadOnlyError,
    OSError,
)
# Options that belong to us or that we set ourselves; the rest go to redis-py.
# redis-py's retry options are ours too: it would re-send a command whose reply was
# lost, and a script sent twice must be the caller's choice, never the driver's.
_RESERVED = {"self", "host", "port", "db", "username", "password", "ssl",
             "connection_pool", "decode_responses", "single_connection_client",
             "unix_socket_path", "auto_close_connection_pool",
             "retry", "retry_on_error", "retry_on_timeout"}
_CLIENT_OPTIONS = set(inspect.signature(aioredis.Redis.__init__).parameters) - _RESERVED
# Shared clients by (pid, loop, settings). Entries of a parent process or of a
# finished loop stay referenced, never collected: finalizing a client closes its
# transports, and in a forked child that unregisters the parent's sockets from
# the epoll set both processes share.
_LINKS: dict[tuple[Any, ...], _Link] = {}
_ORPHANS: list[Any] = []


# --- Lua ------------------------------------------------------------------
# Every script gets the prefix (with its trailing ':') as ARGV[1]. Time comes
# from the server clock, so leases behave the same whatever the workers' clocks.

_PRELUDE = """
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function tkey(id) return P .. 't:' .. id end
local function qkey(q, kind) return P .. 'q:' .. q .. ':' .. kind end
local function ukey(u) return P .. 'u:' .. u end
local function wake(q)
  local k = qkey(q, 'wake')
  if redis.call('LLEN', k) < MAX_TOKENS then redis.call('RPUSH', k, '1') end
end
-- Ready again: one HSET for the state, the member and the caller's `extra` fields.
local function push_ready(id, q, prio, extra)
  local m = string.format('%016x', redis.call('INCR', P .. 'seq')) .. id
  redis.call('ZADD', qkey(q, 'ready'), -prio, m)
  local fields = {'s', 'w', 'm', m}
  for _, v in ipairs(extra or {}) do fields[#fields + 1] = v end
  redis.call('HSET', tkey(id), unpack(fields))
end
local function unlink(id, f)
  local s, q = f[1], f[3]
  if s == 'w' then redis.call('ZREM', qkey(q, 'ready'), f[2])
  elseif s == 's' then redis.call('ZREM', qkey(q, 'delayed'), id)
  elseif s == 'r' then redis.call('ZREM', qkey(q, 'leases'), id)
  elseif s == 'f' then redis.call('ZREM', qkey(q, 'failed'), id) end
end
-- Unique keys are strings P:u:<key> -> task id (a TTL once the task finished).
-- Before issue 8 they were fields of one hash P:unique, freed at ack: an entry
-- found there is still honoured, and moved to its string key when enqueue meets it.
local function unique_holder(u)
  local h = redis.call('GET', ukey(u))
  if h then return h end
  h = redis.call('HGET', P .. 'unique', u)
  if h then
    redis.call('HDEL', P .. 'unique', u)
    redis.call('SET', ukey(u), h)
  end
  return h
end
-- The task finished (or left): hold its key `keep` ms more, or free it now.
local function settle_unique(id, u, keep)
  if not u or u == '' then return end
  local k = ukey(u)
  local h = redis.call('GET', k)
  if not h and redis.call('HGET', P .. 'unique', u) == id then
    redis.call('HDEL', P .. 'unique', u)
    h = id
    if keep > 0 then redis.call('SET', k, id) end
  end
  if h ~= id then return end
  if keep > 0 then redis.call('PEXPIRE', k, keep) else redis.call('DEL', k) end
end
""".replace("MAX_TOKENS", str(WAKE_TOKENS))

# ARGV: P, id, payload, queue, priority, eta_ms (0 = none), unique key ('' = none),
# unique_ttl_ms. A task of this id that is unfinished is left alone (a re-sent
# enqueue); a dead letter of this id is queued again from scratch.
_ENQUEUE = """
local id, q, prio, eta, u = ARGV[2], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local k = tkey(id)
local old = redis.call('HMGET', k, 's', 'm', 'q')
if old[1] and old[1] ~= 'f' then return id end
if u ~= '' then
  local holder = unique_holder(u)
  if holder and holder ~= id then
    -- Held: by an unfinished task, or (with a TTL) for unique_ttl after it finished.
    if redis.call('PTTL', ukey(u)) > 0 then return holder end
    local hs = redis.call('HGET', tkey(holder), 's')
    if hs and hs ~= 'f' then return holder end
  end
  redis.call('SET', ukey(u), id)
end
if old[1] then unlink(id, old) end
local fields = {'d', ARGV[3], 'q', q, 'p', prio, 'a', 0, 'u', u, 'ut', ARGV[8], 't', ''}
if eta > 0 and eta > now_ms() then
  redis.call('ZADD', qkey(q, 'delayed'), eta, id)
  fields[#fields + 1] = 's'
  fields[#fields + 1] = 's'
  redis.call('HSET', k, unpack(fields))
else
  push_ready(id, q, prio, fields)
end
redis.call('SADD', P .. 'queues', q)
wake(q)
return id
"""

# ARGV: P, lease_ms, claim id, n, n unsettled claim ids, queue...
# -> {payload, attempt, claim id, task id, queue, unsettled ids checked} or ms until
# the next ETA/lease deadline (-1 = none).
# The client chooses the claim id, which becomes the lease token, and P:c:<claim id>
# names the claimed task for a lease's time: a claim whose reply was lost is found
# again by the same client's next call, which passes the ids of its failed calls
# (one call at a time: the store object hands each id to one call only).
# Due delayed tasks and expired leases move to ready first (an expired lease loses
# its token); the attempt is counted here, when the lease is taken.
_CLAIM = """
local lease, cid, n = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local now = now_ms()
local function refind(i)
  local c = ARGV[4 + i]
  local id = redis.call('GET', P .. 'c:' .. c)
  if not id then return nil end
  local f = redis.call('HMGET', tkey(id), 's', 't', 'a', 'd', 'q')
  if f[1] ~= 'r' or f[2] ~= c then return nil end
  -- Kept (not deleted): this reply may be lost too, and the next call asks again.
  redis.call('PEXPIRE', P .. 'c:' .. c, lease)
  redis.call('ZADD', qkey(f[5], 'leases'), now + lease, id)
  return {f[4] or '', f[3], c, id, f[5], i}
end
local function requeue(zkey, q, extra)
  local ids = redis.call('ZRANGEBYSCORE', zkey, '-inf', now, 'LIMIT', 0, 500)
  for _, id in ipairs(ids) do
    redis.call('ZREM', zkey, id)
    local p = redis.call('HGET', tkey(id), 'p')
    if p then push_ready(id, q, tonumber(p), extra) end
  end
end
local function pop(q)
  local ready = qkey(q, 'ready')
  while true do
    local top = redis.call('ZPOPMIN', ready)
    if #top == 0 then return nil end
    local id = string.sub(top[1], 17)
    local k = tkey(id)
    local f = redis.call('HMGET', k, 's', 'm', 'd', 'a')
    if f[1] == 'w' and f[2] == top[1] then
      local attempt = (tonumber(f[4]) or 0) + 1
      redis.call('HSET', k, 's', 'r', 't', cid, 'a', attempt)
      redis.call('SET', P .. 'c:' .. cid, id, 'PX', lease)
      redis.call('ZADD', qkey(q, 'leases'), now + lease, id)
      return {f[3] or '', attempt, cid, id, q, n}
    end
  end
end
for i = 1, n do
  local got = refind(i)
  if got then return got end
end
for i = 5 + n, #ARGV do
  requeue(qkey(ARGV[i], 'delayed'), ARGV[i])
  requeue(qkey(ARGV[i], 'leases'), ARGV[i], {'t', ''})
  local got = pop(ARGV[i])
  if got then return got end
end
local due = -1
for i = 5 + n, #ARGV do
  for _, kind in ipairs({'delayed', 'leases'}) do
    local first = redis.call('ZRANGE', qkey(ARGV[i], kind), 0, 0, 'WITHSCORES')
    if #first > 0 then
      local d = math.max(0, tonumber(first[2]) - now)
      if due < 0 or d < due then due = d end
    end
  end
  -- Nothing is claimable: tokens left in the list are stale.
  redis.call('DEL', qkey(ARGV[i], 'wake'))
end
return due
"""

# Settlements act only while the token holds the lease (s = r, t = token). A token
# that already settled this way (its reply was lost and the call is sent again) finds
# its own result: t is cleared whenever a lease ends otherwise (expiry, release,
# re-enqueue).

# ARGV: P, id, token, failed ('1'/'0')
_ACK = """
local id = ARGV[2]
local k = tkey(id)
local f = redis.call('HMGET', k, 's', 'm', 'q', 'u', 't', 'ut')
if f[5] ~= ARGV[3] then return 0 end
if f[1] == 'f' and ARGV[4] == '1' then return 1 end
if f[1] ~= 'r' then return 0 end
unlink(id, f)
settle_unique(id, f[4], tonumber(f[6]) or 0)
if ARGV[4] == '1' then
  redis.call('HSET', k, 's', 'f')
  redis.call('ZADD', qkey(f[3], 'failed'), now_ms(), id)
else
  redis.call('DEL', k)
end
return 1
"""

# ARGV: P, id, token, delay_ms
_RETRY = """
local id = ARGV[2]
local f = redis.call('HMGET', tkey(id), 's', 'm', 'q', 'p', 't')
if f[5] ~= ARGV[3] then return 0 end
if f[1] == 's' or f[1] == 'w' then return 1 end
if f[1] ~= 'r' then return 0 end
unlink(id, f)
local delay = tonumber(ARGV[4])
if delay > 0 then
  redis.call('ZADD', qkey(f[3], 'delayed'), now_ms() + delay, id)
  redis.call('HSET', tkey(id), 's', 's')
else
  push_ready(id, f[3], tonumber(f[4]))
end
wake(f[3])
return 1
"""

# ARGV: P, id, token
_RELEASE = """
local id = ARGV[2]
local k = tkey(id)
local f = redis.call('HMGET', k, 's', 'm', 'q', 'p', 't', 'a')
if f[1] ~= 'r' or f[5] ~= ARGV[3] then return 0 end
unlink(id, f)
push_ready(id, f[3], tonumber(f[4]), {'a', math.max(0, (tonumber(f[6]) or 0) - 1), 't', ''})
wake(f[3])
return 1
"""

# ARGV: P, id, token, lease_ms
_EXTEND = """
local f = redis.call('HMGET', tkey(ARGV[2]), 's', 't', 'q')
if f[1] ~= 'r' or f[2] ~= ARGV[3] then return 0 end
redis.call('ZADD', qkey(f[3], 'leases'), now_ms() + tonumber(ARGV[4]), ARGV[2])
return 1
"""

# ARGV: P, id
_CANCEL = """
local id = ARGV[2]
local f = redis.call('HMGET', tkey(id), 's', 'm', 'q', 'u')
if f[1] ~= 'w' and f[1] ~= 's' then return 0 end
unlink(id, f)
settle_unique(id, f[4], 0)
redis.call('DEL', tkey(id))
return 1
"""

# ARGV: P -> flat {queue, queued, scheduled, running, failed, ...}
_STATS = """
local now = now_ms()
local out = {}
for _, q in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  local due = redis.call('ZCOUNT', qkey(q, 'delayed'), '-inf', now)
  out[#out + 1] = q
  out[#out + 1] = redis.call('ZCARD', qkey(q, 'ready')) + due
  out[#out + 1] = redis.call('ZCARD', qkey(q, 'delayed')) - due
  out[#out + 1] = redis.call('ZCARD', qkey(q, 'leases'))
  out[#out + 1] = redis.call('ZCARD', qkey(q, 'failed'))
end
return out
"""

# ARGV: P, limit, queue ('' = all) -> {dropped, popped}
_PURGE = """
local limit = tonumber(ARGV[2])
local queues = {ARGV[3]}
if ARGV[3] == '' then queues = redis.call('SMEMBERS', P .. 'queues') end
local dropped, popped = 0, 0
local kinds = {{'ready', 'w'}, {'delayed', 's'}, {'failed', 'f'}}
for _, q in ipairs(queues) do
  for _, kind in ipairs(kinds) do
    if popped < limit then
      local items = redis.call('ZPOPMIN', qkey(q, kind[1]), limit - popped)
      for i = 1, #items, 2 do
        popped = popped + 1
        local id = items[i]
        if kind[2] == 'w' then id = string.sub(id, 17) end
        local f = redis.call('HMGET', tkey(id), 's', 'm', 'u')
        if f[1] == kind[2] and (kind[2] ~= 'w' or f[2] == items[i]) then
          settle_unique(id, f[3], 0)
          redis.call('DEL', tkey(id))
          dropped = dropped + 1
        end
      end
    end
  end
end
return {dropped, popped}
"""

# ARGV: P, worker id, payload, ttl_ms
_WORKER_SET = """
redis.call('HSET', P .. 'workers', ARGV[2], ARGV[3])
redis.call('ZADD', P .. 'workers:ttl', now_ms() + tonumber(ARGV[4]), ARGV[2])
return 1
"""

# ARGV: P, worker id
_WORKER_DELETE = """
redis.call('HDEL', P .. 'workers', ARGV[2])
return redis.call('ZREM', P .. 'workers:ttl', ARGV[2])
"""

# ARGV: P -> payloads of live workers (the expired ones are dropped)
_WORKER_LIST = """
local now = now_ms()
local dead = redis.call('ZRANGEBYSCORE', P .. 'workers:ttl', '-inf', now)
for _, id in ipairs(dead) do redis.call('HDEL', P .. 'workers', id) end
redis.call('ZREMRANGEBYSCORE', P .. 'workers:ttl', '-inf', now)
return redis.call('HVALS', P .. 'workers')
"""

# ARGV: P, id, payload, finished_ms, expires_ms (0 = never) -> 1 stored, 0 another
# outcome is there (kept). The first final outcome wins: SET NX, and an expired
# result is already gone (PXAT). The same bytes found there are this very write,
# sent again after its reply was lost: that is a 1, announced once.
_RESULT_STORE = """
local id, exp = ARGV[2], tonumber(ARGV[5])
local k = P .. 'r:' .. id
local stored
if exp > 0 then
  stored = redis.call('SET', k, ARGV[3], 'NX', 'PXAT', exp)
else
  stored = redis.call('SET', k, ARGV[3], 'NX')
end
if not stored then
  if redis.call('GET', k) == ARGV[3] then return 1 end
  return 0
end
if exp > 0 then
  redis.call('ZADD', P .. 'ri:expiry', exp, id)
else
  redis.call('ZREM', P .. 'ri:expiry', id)
end
redis.call('ZADD', P .. 'ri:finished', tonumber(ARGV[4]), id)
redis.call('PUBLISH', k, ARGV[3])
return 1
"""

# ARGV: P, id -> 1 if a result was there
_RESULT_DELETE = """
redis.call('ZREM', P .. 'ri:expiry', ARGV[2])
redis.call('ZREM', P .. 'ri:finished', ARGV[2])
return redis.call('DEL', P .. 'r:' .. ARGV[2])
"""

# ARGV: P, limit, expires_ms (inclusive), finished_before_ms (exclusive, '' = unused)
_RESULT_CLEANUP = """
local limit = tonumber(ARGV[2])
local function sweep(index, upto, n)
  local ids = redis.call('ZRANGEBYSCORE', P .. index, '-inf', upto, 'LIMIT', 0, n)
  for _, id in ipairs(ids) do
    redis.call('DEL', P .. 'r:' .. id)
    redis.call('ZREM', P .. 'ri:expiry', id)
    redis.call('ZREM', P .. 'ri:finished', id)
  end
  return #ids
end
local n = sweep('ri:expiry', ARGV[3], limit)
if n < limit and ARGV[4] ~= '' then n = n + sweep('ri:finished', '(' .. ARGV[4], limit - n) end
return n
"""

# ARGV: P, maxlen, ttl_ms (0 = none), then (task id, ts_ms, payload, needle) per event;
# needle is '"id":' + the event id as JSON. An event whose needle is in its task's list
# is there already (a write sent again after a lost reply): it is dropped. A task's
# list is read once per call and holds its few events, so the check is one LRANGE
# per task; the index is touched only when the task's oldest time changes, and the
# list's TTL and last-append time once per task: 8 commands for a task's first event,
# 6 for the next ones (8 each before ids, without the check).
_EVENTS_APPEND = """
local maxlen, ttl = ARGV[2], tonumber(ARGV[3])
local stream, index, seen = P .. 'e:all', P .. 'e:index', P .. 'e:seen'
local lists, touched, grew, now = {}, {}, false, 0
local function list_of(tid)
  local l = lists[tid]
  if l then return l end
  l = {items = redis.call('LRANGE', P .. 'et:' .. tid, 0, -1), added = {}}
  for _, item in ipairs(l.items) do
    local ts = tonumber(string.match(item, '^%d+'))
    if ts and (not l.oldest or ts < l.oldest) then l.oldest = ts end
  end
  lists[tid] = l
  return l
end
local function stored(l, needle)
  if l.added[needle] then return true end
  for _, item in ipairs(l.items) do
    if string.find(item, needle, 1, true) then return true end
  end
  return false
end
for i = 4, #ARGV, 4 do
  local tid, ts, needle = ARGV[i], ARGV[i + 1], ARGV[i + 3]
  local l = list_of(tid)
  if not stored(l, needle) then
    l.added[needle] = true
    local gid = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'd', ARGV[i + 2])
    -- The entry id is the server's time in ms (never behind the stream's last id):
    -- the clock of the TTLs below, without a TIME call.
    now = tonumber(string.match(gid, '^%d+'))
    redis.call('RPUSH', P .. 'et:' .. tid, ts .. ' ' .. gid .. ' ' .. ARGV[i + 2])
    if not l.oldest or tonumber(ts) < l.oldest then
      redis.call('ZADD', index, 'LT', ts, tid)
      grew = grew or not l.oldest
      l.oldest = tonumber(ts)
    end
    if not l.touched then
      l.touched = true
      touched[#touched + 1] = tid
    end
  end
end
if ttl > 0 then
  for _, tid in ipairs(touched) do
    redis.call('PEXPIRE', P .. 'et:' .. tid, ttl)
    redis.call('ZADD', seen, now, tid)
  end
  -- Index entries of lists that have expired would otherwise pile up: each call
  -- that adds entries removes up to 100 of those.
  if grew then
    local gone = redis.call('ZRANGEBYSCORE', seen, '-inf', '(' .. (now - ttl), 'LIMIT', 0, 100)
    for _, tid in ipairs(gone) do
      redis.call('ZREM', index, tid)
      redis.call('ZREM', seen, tid)
    end
  end
end
return 1
"""

# ARGV: P, limit, before_ms -> {tasks visited, events removed}
_EVENTS_CLEANUP = """
local limit, before = tonumber(ARGV[2]), tonumber(ARGV[3])
local stream, index = P .. 'e:all', P .. 'e:index'
local ids = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. before, 'LIMIT', 0, limit)
local removed = 0
for _, tid in ipairs(ids) do
  local k = P .. 'et:' .. tid
  local ttl = redis.call('PTTL', k)
  local keep, oldest = {}, nil
  for _, item in ipairs(redis.call('LRANGE', k, 0, -1)) do
    local a = string.find(item, ' ', 1, true)
    local b = string.find(item, ' ', a + 1, true)
    local ts = tonumber(string.sub(item, 1, a - 1))
    if ts < before then
      redis.call('XDEL', stream, string.sub(item, a + 1, b - 1))
      removed = removed + 1
    else
      keep[#keep + 1] = item
      if not oldest or ts < oldest then oldest = ts end
    end
  end
  redis.call('DEL', k)
  if oldest then
    for i = 1, #keep, 100 do
      redis.call('RPUSH', k, unpack(keep, i, math.min(i + 99, #keep)))
    end
    if ttl > 0 then redis.call('PEXPIRE', k, ttl) end
    redis.call('ZADD', index, oldest, tid)
  else
    redis.call('ZREM', index, tid)
    redis.call('ZREM', P .. 'e:seen', tid)
  end
end
return {#ids, removed}
"""

SCRIPTS: dict[str, str] = {
    "enqueue": _ENQUEUE,
    "claim": _CLAIM,
    "ack": _ACK,
    "retry": _RETRY,
    "release": _RELEASE,
    "extend": _EXTEND,
    "cancel": _CANCEL,
    "stats": _STATS,
    "purge": _PURGE,
    "worker_set": _WORKER_SET,
    "worker_list": _WORKER_LIST,
    "worker_delete": _WORKER_DELETE,
    "result_store": _RESULT_STORE,
    "result_delete": _RESULT_DELETE,
    "result_cleanup": _RESULT_CLEANUP,
    "events_append": _EVENTS_APPEND,
    "events_cleanup": _EVENTS_CLEANUP,
}
_SOURCES = {name: (_PRELUDE + body).encode() for name, body in SCRIPTS.items()}
_SHAS = {name: hashlib.sha1(src).hexdigest() for name, src in _SOURCES.items()}
_NAMES = {sha: name for name, sha in _SHAS.items()}


def _ms(value: datetime | None) -> int:
    return 0 if value is None else int(value.timestamp() * 1000)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- connection ---------------------------------------------------------


class _Connection:
    """Settings, the lazily built client (rebuilt after fork or on a new loop),
    script calls by EVALSHA and the translation of driver errors."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        db: int,
        username: str | None,
        password: str | None,
        url: str | None,
        tls: bool,
        options: Mapping[str, Any],
    ) -> None:
        self.url = _checked_url(url, tls) if url else None
        self.where = _where(self.url) if self.url else f"{host}:{port}"
        self._secret = password or (urlsplit(self.url).password if self.url else None)
        opts = _checked_options(options)
        # Replies are timed by us, per round trip: redis-py's own socket_timeout
        # costs an extra asyncio task on every send.
        self.timeout: float | None = opts.pop("socket_timeout", 5.0)
        self._kwargs: dict[str, Any] = {
            "db": db,
            "username": username,
            "password": password,
            "socket_timeout": None,
            "socket_connect_timeout": 5.0,
            "protocol": 2,  # stable reply shapes across redis-py versions
            "retry": Retry(NoBackoff(), 0),  # never re-send: see the module docstring
            **opts,
        }
        if not self.url:
            self._kwargs.update(host=host, port=port, ssl=tls)
        # Stores of one process and loop with the same settings share a client,
        # so the queue, result and event calls of a worker share round trips.
        self._ident = (self.url, host, port, db, username, password, tls,
                       repr(sorted(opts.items())), self.timeout)
        self._link: _Link | None = None
        self._pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def client(self) -> aioredis.Redis:
        """The client for blocking commands and Pub/Sub (each takes its own connection)."""
        return self._ensure().client

    def _ensure(self) -> _Link:
        loop = asyncio.get_running_loop()
        link = self._link
        if link is None or self._pid != os.getpid() or self._loop is not loop:
            # A forked child or a new loop never reuses the old sockets.
            key = (os.getpid(), loop, self._ident)
            link = _LINKS.get(key)
            if link is None:
                link = _LINKS[key] = _Link(self._new_client(), self.timeout)
            link.users += 1
            self._link, self._pid, self._loop = link, os.getpid(), loop
        return link

    def _new_client(self) -> aioredis.Redis:
        if self.url:
            return aioredis.Redis.from_url(self.url, **self._kwargs)
        return aioredis.Redis(**self._kwargs)

    def current(self) -> aioredis.Redis | None:
        """The client if it belongs to this process and loop, else None."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if self._link is not None and self._pid == os.getpid() and self._loop is loop:
            return self._link.client
        return None

    async def open(self) -> None:
        await self.call("PING")

    async def close(self) -> None:
        client, link, self._link = self.current(), self._link, None
        if client is None or link is None:
            return  # another process's or a finished loop's: left alone
        link.users -= 1
        if link.users <= 0:
            _LINKS.pop((self._pid, self._loop, self._ident), None)
            await client.aclose()

    async def call(self, *args: Any) -> Any:
        """One non-blocking command, pipelined with those of concurrent callers."""
        return await self._ensure().batcher.call(args)

    @contextlib.asynccontextmanager
    async def deadline(self, seconds: float | None) -> AsyncIterator[None]:
        """Bound a blocking call: `seconds` of waiting plus the reply timeout."""
        limit = None if self.timeout is None or seconds is None else seconds + self.timeout
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            raise rexc.TimeoutError(f"no reply within {limit:.1f} s") from None

    async def script(self, name: str, *args: Any) -> Any:
        return await self.call("EVALSHA", _SHAS[name], 0, *args)

    def translate(self, exc: BaseException) -> OmniQError:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        if self._secret:
            detail = detail.replace(self._secret, "***")
        detail = redact(detail)
        if len(detail) > 300:
            detail = detail[:297] + "..."
        if isinstance(exc, _UNAVAILABLE):
            return BackendUnavailable(f"Redis at {self.where} is unavailable: {detail}")
        return BackendError(f"Redis at {self.where} failed: {detail}")


class _Link:
    """A client and its batcher, shared by equal stores of one process and loop."""

    def __init__(self, client: aioredis.Redis, timeout: float | None) -> None:
        self.client = client
        self.batcher = _Batcher(client, timeout)
        self.users = 0


class _Batcher:
    """Auto-pipelining: the commands issued while a round trip is in flight go
    out together in the next one.

    On a busy host a loopback round trip costs ~100 us of CPU in syscalls and
    redis-py, a pipelined command a few us: concurrent tasks of a worker share
    round trips instead of paying one each.
    """

    def __init__(self, client: aioredis.Redis, timeout: float | None) -> None:
        self._client = client
        self._timeout = timeout
        self._waiting: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def call(self, args: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((args, fut))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    replies = await self._send([args for args, _ in batch])
                except Exception as exc:
                    _settle(batch, None, exc)
                except BaseException:
                    _settle(batch, None, rexc.ConnectionError("connection closed"))
                    raise
                else:
                    _settle(batch, replies, None)
                # Let the callers just answered issue their next commands first.
                await asyncio.sleep(0)
        finally:
            self._drainer = None
            if self._waiting:  # cancelled with callers left: they must not hang
                _settle(self._waiting, None, rexc.ConnectionError("connection closed"))
                self._waiting = []

    async def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Replies (a ResponseError instance where one command failed); a lost
        connection raises for the whole batch."""
        replies = await self._execute(commands)
        missing = [i for i, r in enumerate(replies) if isinstance(r, rexc.NoScriptError)]
        if missing:
            # The server restarted or SCRIPT FLUSH ran: load the scripts again.
            for sha in {commands[i][1] for i in missing}:
                await self._client.script_load(_SOURCES[_NAMES[sha]])
            again = await self._execute([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        try:
            async with asyncio.timeout(self._timeout):
                if len(commands) == 1:
                    try:
                        return [await self._client.execute_command(*commands[0])]
                    except rexc.ResponseError as exc:
                        return [exc]
                pipe = self._client.pipeline(transaction=False)
                for args in commands:
                    pipe.execute_command(*args)
                return await pipe.execute(raise_on_error=False)
        except TimeoutError:
            # The connection was dropped by redis-py on cancel: no stray reply later.
            raise rexc.TimeoutError(f"no reply within {self._timeout} s") from None


def _settle(
    batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]],
    replies: list[Any] | None,
    error: Exception | None,
) -> None:
    for i, (_, fut) in enumerate(batch):
        if fut.done():
            continue
        reply = replies[i] if replies is not None else error
        if isinstance(reply, Exception):
            fut.set_exception(reply)
        else:
            fut.set_result(reply)


def _checked_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - _CLIENT_OPTIONS)
    if unknown:
        raise ConfigError(
            f"unknown Redis option(s) {', '.join(map(repr, unknown))}; "
            "options are passed to redis.asyncio.Redis (e.g. socket_timeout, ssl_ca_certs)"
        )
    return dict(options)


def _checked_url(url: str, tls: bool) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            "Redis url must start with redis://, rediss:// or unix:// "
            f"(got {parts.scheme + '://' if parts.scheme else 'no scheme'})"
        )
    if tls and parts.scheme == "redis":
        return urlunsplit(parts._replace(scheme="rediss"))
    return url


def _where(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigError("Redis url has an invalid port") from None
    return f"{parts.hostname or 'localhost'}:{port}"


S = TypeVar("S", bound="_RedisStore")
P = ParamSpec("P")
R = TypeVar("R")


def _guarded(
    fn: Callable[Concatenate[S, P], Awaitable[R]],
) -> Callable[Concatenate[S, P], Awaitable[R]]:
    """Turn driver errors into omniq.errors at the public boundary."""

    @functools.wraps(fn)
    async def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(self, *args, **kwargs)
        except (rexc.RedisError, OSError) as exc:
            raise self._conn.translate(exc) from exc

    return wrapper


class _RedisStore:
    """What the three stores share: settings, prefix, connection lifecycle."""

    _own_options: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        db: int = 0,
        *,
        username: str | None = None,
        password: str | None = None,
        url: str | None = None,
        prefix: str = "omniq",
        tls: bool = False,
        options: Mapping[str, Any] | None = None,
        **client_options: Any,
    ) -> None:
        if not PREFIX_RE.match(prefix):
            raise ConfigError(
                f"Redis prefix {prefix!r} is invalid: use 1-64 letters, digits, '_', '.' "
                "or '-', starting with a letter or digit (no ':', spaces or braces)"
            )
        opts = {**(options or {}), **client_options}
        tls = tls or bool(opts.pop("ssl", False))  # redis-py's name for the same switch
        self._opts = {name: opts.pop(name, default) for name, default in self._own_options.items()}
        self._conn = _Connection(
            host=host, port=port, db=db, username=username, password=password,
            url=url, tls=tls, options=opts,
        )
        self.prefix = prefix
        self._p = prefix + ":"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._conn.where!r}, prefix={self.prefix!r})"

    @_guarded
    async def open(self) -> None:
        await self._conn.open()

    async def close(self) -> None:
        with contextlib.suppress(rexc.RedisError, OSError):
            await self._conn.close()

    async def __aenter__(self: S) -> S:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _redis(self) -> aioredis.Redis:
        return self._conn.client()

    async def _script(self, name: str, *args: Any) -> Any:
        return await self._conn.script(name, self._p, *args)


# --- queue ------------------------------------------------------------------


class _Claims:
    """The claim ids of one store object's claim calls that got no reply.

    Such a claim may have taken a lease on the server: the next claim call asks for
    those ids first, so the task is delivered instead of waiting for its lease to
    expire (whatever queues that call names: a worker's queues do not change). Kept
    per process (a forked child must not pick up its parent's claims) and only while
    their lease could still hold.
    """

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}  # claim id -> monotonic end of its lease
        self._pid = os.getpid()

    def begin(self, lease: float) -> tuple[str, float, list[tuple[str, float]]]:
        """A new claim id, its lease end, and the unsettled ids this call asks about
        (taken out, so concurrent calls never ask about the same one)."""
        if self._pid != os.getpid():
            self._pending, self._pid = {}, os.getpid()
        now = time.monotonic()
        live = [(c, until) for c, until in self._pending.items() if until > now]
        asked, kept = live[:UNSETTLED_PER_CALL], live[UNSETTLED_PER_CALL:]
        self._pending = dict(kept)
        return os.urandom(10).hex(), now + lease, asked

    def failed(self, claim: tuple[str, float], asked: list[tuple[str, float]]) -> None:
        """The call got no reply: its own id and those it asked about stay unsettled."""
        for cid, until in [*asked, claim]:
            self._pending[cid] = until
        while len(self._pending) > UNSETTLED_MAX:
            del self._pending[next(iter(self._pending))]

    def answered(self, asked: list[tuple[str, float]], checked: int) -> None:
        """The server checked the first `checked` ids asked about; the rest stay."""
        for cid, until in asked[checked:]:
            self._pending[cid] = until


class RedisQueue(_RedisStore):
    """Tasks in Redis; claims, leases and retries are single Lua scripts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._claims = _Claims()

    @_guarded
    async def enqueue(self, task: Task) -> str:
        check_queue_name(task.queue)
        got = await self._script(
            "enqueue", task.id, encode_task(task), task.queue, task.priority,
            _ms(task.eta), task.unique_key or "", int((task.unique_ttl or 0) * 1000),
        )
        return _text(got)

    @_guarded
    async def dequeue(
        self, queues: Sequence[str], lease: float, timeout: float
    ) -> Delivery | None:
        names = list(queues)
        if not names:
            raise ValueError("dequeue needs at least one queue name")
        for name in names:
            check_queue_name(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        wake_keys = [f"{self._p}q:{name}:wake" for name in names]
        while True:
            got = await self._claim(names, lease)
            if isinstance(got, Delivery):
                return got
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            pause = min(remaining, BLOCK_SLICE)
            if got >= 0:  # an ETA or a lease deadline is coming up
                pause = min(pause, got / 1000 + 0.002)
            await self._nap(wake_keys, pause)

    async def _claim(self, names: list[str], lease: float) -> Delivery | int:
        """One claim script: a delivery, or ms until the next ETA/lease deadline."""
        cid, until, asked = self._claims.begin(lease)
        try:
            got = await self._script("claim", int(lease * 1000), cid, len(asked),
                                     *(c for c, _ in asked), *names)
        except BaseException:  # no reply: the server may have taken a lease for us
            self._claims.failed((cid, until), asked)
            raise
        if not isinstance(got, list):
            self._claims.answered(asked, len(asked))
            return int(got)
        data, attempt, token, task_id, queue, checked = got
        self._claims.answered(asked, int(checked))
        task, problem = decode_task_or_placeholder(data, _text(task_id), _text(queue))
        return Delivery(task=task, attempt=int(attempt), receipt=_text(token), problem=problem)

    async def _nap(self, wake_keys: list[str], pause: float) -> None:
        """Block until a wake token arrives or `pause` passes."""
        if pause < 0.01:  # BLPOP 0 would block forever
            await asyncio.sleep(pause)
            return
        async with self._conn.deadline(pause):
            await self._redis().blpop(wake_keys, timeout=round(pause, 3))

    @_guarded
    async def ack(self, delivery: Delivery, *, failed: bool = False) -> bool:
        got = await self._script("ack", delivery.task_id, str(delivery.receipt),
                                 "1" if failed else "0")
        return bool(got)

    @_guarded
    async def retry(self, delivery: Delivery, delay: float) -> bool:
        got = await self._script("retry", delivery.task_id, str(delivery.receipt),
                                 int(max(0.0, delay) * 1000))
        return bool(got)

    @_guarded
    async def release(self, delivery: Delivery) -> None:
        await self._script("release", delivery.task_id, str(delivery.receipt))

    @_guarded
    async def extend(self, delivery: Delivery, lease: float) -> bool:
        got = await self._script("extend", delivery.task_id, str(delivery.receipt),
                                 int(lease * 1000))
        return bool(got)

    @_guarded
    async def cancel(self, task_id: str) -> bool:
        return bool(await self._script("cancel", task_id))

    @_guarded
    async def get_task(self, task_id: str) -> Task | None:
        data, queue = await self._conn.call("HMGET", f"{self._p}t:{task_id}", "d", "q")
        if data is None and queue is None:
            return None
        task, _ = decode_task_or_placeholder(data or b"", task_id, _text(queue or "default"))
        return task

    @_guarded
    async def stats(self) -> list[QueueStats]:
        flat = await self._script("stats")
        out = []
        for i in range(0, len(flat), 5):
            queued, scheduled, running, failed = (int(n) for n in flat[i + 1 : i + 5])
            if queued or scheduled or running or failed:
                out.append(QueueStats(_text(flat[i]), queued=queued, scheduled=scheduled,
                                      running=running, failed=failed))
        return sorted(out, key=lambda s: s.queue)

    @_guarded
    async def purge(self, queue: str | None = None) -> int:
        if queue is not None:
            check_queue_name(queue)
        total = 0
        while True:
            dropped, popped = await self._script("purge", BATCH, queue or "")
            total += int(dropped)
            if int(popped) < BATCH:
                return total

    @_guarded
    async def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        await self._script("worker_set", info.worker_id, encode_worker(info), int(ttl * 1000))

    @_guarded
    async def unregister_worker(self, worker_id: str) -> None:
        await self._script("worker_delete", worker_id)

    @_guarded
    async def workers(self) -> list[WorkerInfo]:
        rows = await self._script("worker_list")
        return sorted((decode_worker(r) for r in rows), key=lambda w: w.worker_id)


# --- results ----------------------------------------------------------------


class _Subscriber:
    """One Pub/Sub connection shared by every `wait` of a result store.

    A waiter subscribes, waits for the server's confirmation, then re-reads
    the result: a store that lands before the confirmation is seen by the read,
    one after it by the notification, which carries the result itself.
    """

    def __init__(self, client: aioredis.Redis, timeout: float | None) -> None:
        self.client = client
        self._timeout = timeout
        self._pubsub = client.pubsub()
        self._boxes: dict[str, set[_Mailbox]] = {}
        self._confirm: dict[str, list[asyncio.Future[None]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.broken: BaseException | None = None

    @contextlib.asynccontextmanager
    async def watch(self, channel: str) -> AsyncIterator[_Mailbox]:
        box = _Mailbox()
        waiters = self._boxes.setdefault(channel, set())
        first = not waiters
        waiters.add(box)
        try:
            if first:
                await self._subscribe(channel)
            elif self._confirm.get(channel):
                await asyncio.shield(self._confirm[channel][-1])
            yield box
        finally:
            waiters.discard(box)
            if not waiters and self._boxes.get(channel) is waiters:
                del self._boxes[channel]
                if self.broken is None:
                    with contextlib.suppress(rexc.RedisError, OSError):
                        async with asyncio.timeout(self._timeout):
                            await self._pubsub.unsubscribe(channel)

    async def _subscribe(self, channel: str) -> None:
        if self.broken is not None:
            raise rexc.ConnectionError(str(self.broken))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending = self._confirm.setdefault(channel, [])
        pending.append(fut)
        try:
            async with asyncio.timeout(self._timeout):
                await self._pubsub.subscribe(channel)
            if self._reader is None:
                self._reader = asyncio.create_task(self._read())
            await asyncio.wait_for(asyncio.shield(fut), 10.0)
        except BaseException:
            if fut in pending:
                pending.remove(fut)
            if not pending and self._confirm.get(channel) is pending:
                del self._confirm[channel]
            raise

    async def _read(self) -> None:
        try:
            while True:
                msg = await self._pubsub.get_message(timeout=RESULT_SLICE)
                if msg:
                    self._dispatch(_text(msg["type"]), _text(msg["channel"]), msg["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(exc)

    def _dispatch(self, kind: str, channel: str, data: Any) -> None:
        if kind == "subscribe":
            pending = self._confirm.get(channel)
            if pending:
                fut = pending.pop(0)
                if not pending:
                    del self._confirm[channel]
                if not fut.done():
                    fut.set_result(None)
                return
            # A re-subscribe after a reconnect: results may have been missed.
            data = None
        elif kind != "message":
            return
        for box in self._boxes.get(channel, ()):
            box.put(data)

    def _fail(self, exc: BaseException) -> None:
        self.broken = exc
        for pending in self._confirm.values():
            for fut in pending:
                if not fut.done():
                    fut.set_exception(rexc.ConnectionError(str(exc)))
        self._confirm.clear()
        for boxes in self._boxes.values():
            for box in boxes:
                box.put(None)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()


class _Mailbox:
    """One waiter's wake-up: the payload of the last notification, if any."""

    __slots__ = ("_data", "_event")

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._data: bytes | None = None

    def put(self, data: bytes | None) -> None:
        self._data = data if isinstance(data, bytes) else self._data
        self._event.set()

    async def take(self, timeout: float) -> bytes | None:
        """Wait up to `timeout`; the payload (None: woken without one, or timed out)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._event.wait()
        self._event.clear()
        data, self._data = self._data, None
        return data


def _fresh(result: TaskResult) -> TaskResult | None:
    return None if result.is_expired() else result


class RedisResultStorage(_RedisStore):
    """Results as keys with PEXPIREAT; `wait` is woken by Pub/Sub."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sub: _Subscriber | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def _key(self, task_id: str) -> str:
        return f"{self._p}r:{task_id}"

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None and self._conn.current() is not None:
            await sub.close()
        await super().close()

    @_guarded
    async def store(self, result: TaskResult) -> bool:
        got = await self._script(
            "result_store", result.task_id, encode_result(result),
            _ms(result.finished_at), _ms(result.expires_at),
        )
        return bool(got)

    @_guarded
    async def get(self, task_id: str) -> TaskResult | None:
        data = await self._conn.call("GET", self._key(task_id))
        return None if data is None else _fresh(decode_result(data))

    @_guarded
    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        result = await self.get(task_id)
        if result is not None or (timeout is not None and timeout <= 0):
            return result
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            result = await self._watch(task_id, deadline)
            if result is not None or (deadline is not None and loop.time() >= deadline):
                return result

    async def _watch(self, task_id: str, deadline: float | None) -> TaskResult | None:
        """Wait on one subscription until the result, the deadline, or a broken link."""
        loop = asyncio.get_running_loop()
        sub = self._subscriber()
        async with sub.watch(self._key(task_id)) as box:
            result = await self.get(task_id)
            while result is None and sub.broken is None:
                pause = RESULT_SLICE if deadline is None else min(RESULT_SLICE,
                                                                  deadline - loop.time())
                if pause <= 0:
                    return None
                data = await box.take(pause)
                result = _fresh(decode_result(data)) if data else await self.get(task_id)
        return result

    def _subscriber(self) -> _Subscriber:
        client = self._redis()
        if self._sub is None or self._sub.broken is not None or self._sub.client is not client:
            old = self._sub
            if old is not None and old.client is not client:
                _ORPHANS.append(old)
            elif old is not None:  # broken: release its connection in the background
                closing = asyncio.get_running_loop().create_task(old.close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            self._sub = _Subscriber(client, self._conn.timeout)
        return self._sub

    @_guarded
    async def delete(self, task_id: str) -> bool:
        return bool(await self._script("result_delete", task_id))

    @_guarded
    async def cleanup(self, now: datetime, finished_before: datetime | None = None) -> int:
        total = 0
        before = "" if finished_before is None else str(_ms(finished_before))
        while True:
            n = int(await self._script("result_cleanup", BATCH, _ms(now), before))
            total += n
            if n < BATCH:
                return total


# --- events -----------------------------------------------------------------


class RedisEventStorage(_RedisStore):
    """Events in one capped stream (cursor = entry id) plus a list per task.

    Options: `stream_maxlen` (approximate cap of the global stream, default
    1,000,000) and `event_ttl` (seconds a task's list lives after its last
    event, default 30 days; 0 or None keeps it until cleanup).
    """

    _own_options: ClassVar[dict[str, Any]] = {
        "stream_maxlen": DEFAULT_STREAM_MAXLEN,
        "event_ttl": DEFAULT_EVENT_TTL,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        maxlen = self._opts["stream_maxlen"]
        if not isinstance(maxlen, int) or maxlen < 1:
            raise ConfigError(f"Redis option stream_maxlen must be a positive integer, "
                              f"got {maxlen!r}")
        ttl = self._opts["event_ttl"] or 0
        if not isinstance(ttl, int | float) or ttl < 0:
            raise ConfigError(f"Redis option event_ttl must be seconds >= 0, got {ttl!r}")
        self._maxlen = maxlen
        self._ttl_ms = int(ttl * 1000)
        self._stream = f"{self._p}e:all"

    @_guarded
    async def append(self, event: TaskEvent) -> None:
        await self._append([event])

    @_guarded
    async def append_many(self, events: Sequence[TaskEvent]) -> None:
        for i in range(0, len(events), BATCH):
            await self._append(events[i : i + BATCH])

    async def _append(self, events: Sequence[TaskEvent]) -> None:
        args: list[Any] = []
        for event in events:
            # The id as the serializer writes it: found in a stored payload only there.
            needle = '"id":' + dumps(event.id)
            args += (event.task_id, _ms(event.timestamp), encode_event(event), needle)
        if args:
            await self._script("events_append", self._maxlen, self._ttl_ms, *args)

    @_guarded
    async def get(self, task_id: str) -> list[TaskEvent]:
        items = await self._conn.call("LRANGE", f"{self._p}et:{task_id}", 0, -1)
        return [decode_event(item.split(b" ", 2)[2]) for item in items]

    @_guarded
    async def read(self, after: str | None, limit: int) -> list[tuple[str, TaskEvent]]:
        start = "-" if after is None else "(" + _cursor(after)
        rows = await self._conn.call("XRANGE", self._stream, start, "+", "COUNT", limit)
        return [(_text(cid), decode_event(fields[b"d"])) for cid, fields in rows]

    @_guarded
    async def latest(self, limit: int, before: str | None = None) -> list[tuple[str, TaskEvent]]:
        if limit <= 0:
            return []
        end = "+" if before is None else "(" + _cursor(before)
        rows = await self._conn.call("XREVRANGE", self._stream, end, "-", "COUNT", limit)
        return [(_text(cid), decode_event(fields[b"d"])) for cid, fields in reversed(rows)]

    @_guarded
    async def last_cursor(self) -> str | None:
        rows = await self._conn.call("XREVRANGE", self._stream, "+", "-", "COUNT", 1)
        return _text(rows[0][0]) if rows else None

    @_guarded
    async def wait_new(self, after: str | None, timeout: float) -> None:
        start = "0-0" if after is None else _cursor(after)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            block = int(min(remaining, BLOCK_SLICE) * 1000)
            # XREAD BLOCK 0 would wait forever: a spent timeout is a plain read.
            async with self._conn.deadline(max(block, 0) / 1000):
                rows = await self._redis().xread(
                    {self._stream: start}, count=1, block=block if block > 0 else None
                )
            if rows or block <= 0:
                return

    @_guarded
    async def cleanup(self, before: datetime) -> int:
        cutoff = _ms(before)
        removed = 0
        while True:
            visited, n = await self._script("events_cleanup", BATCH, cutoff)
            removed += int(n)
            if int(visited) < BATCH:
                break
        # Entries whose task list already expired are still in the stream.
        trimmed = await self._conn.call("XTRIM", self._stream, "MINID", f"{cutoff}-0")
        return removed + int(trimmed)


def _cursor(value: str) -> str:
    if not CURSOR_RE.match(value):
        raise ValueError(f"invalid event cursor {value!r} (expected a Redis stream id)")
    return value


# --- factory ----------------------------------------------------------------

_ROLES: dict[str, type[_RedisStore]] = {
    "queue": RedisQueue,
    "results": RedisResultStorage,
    "events": RedisEventStorage,
}
_SETTINGS = ("url", "host", "port", "db", "username", "password", "prefix", "tls")


def create(role: Role, settings: Mapping[str, Any]) -> Any:
    """Build an unopened Redis store of `role` from config settings."""
    unused = sorted(set(settings) - {*_SETTINGS, "options"})
    if unused:
        raise ConfigError(f"the redis backend does not use: {', '.join(unused)}")
    kwargs = {key: settings[key] for key in _SETTINGS if settings.get(key) is not None}
    return _ROLES[role](options=settings.get("options") or {}, **kwargs)
