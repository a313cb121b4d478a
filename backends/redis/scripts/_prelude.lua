-- Shared by every script (prepended when the scripts are loaded). ARGV[1] is the key
-- prefix with its ':'. Placeholders in capitals (the ready base, the format version,
-- the task prefix) are filled in by scripts.py.
local P = ARGV[1]
-- Ready tasks score READY - priority (below 0: higher priority first, then by task
-- id, which starts with its creation time); scheduled tasks and leases score the
-- time in ms when they are due (0 and above). One ZRANGE tells what is ready and
-- when the next timer is due.
local READY = READY_BASE
local function tkey(id) return P .. 't:' .. id end
local function qkey(q) return P .. 'q:' .. q end
local function fkey(q) return P .. 'q:' .. q .. ':failed' end
local function ukey(u) return P .. 'u:' .. u end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- A stream entry id is the server's time in ms (never behind the stream's last id).
local function gid_ms(gid) return tonumber(string.match(gid, '^%d+')) end
local function xadd_event(maxlen, payload, queue)
  if queue then
    return redis.call('XADD', P .. 'e:all', 'MAXLEN', '~', maxlen, '*', 'd', payload, 'w', queue)
  end
  return redis.call('XADD', P .. 'e:all', 'MAXLEN', '~', maxlen, '*', 'd', payload)
end
-- Ready without an event of its own (release, retry, a plain enqueue): idle workers
-- block on this stream and on the event stream.
local function wake(q)
  return redis.call('XADD', P .. 'wake', 'MAXLEN', '16', '*', 'w', q)
end
-- Unique keys are strings P:u:<key> -> task id (a TTL once the task finished).
-- Before issue 8 they were fields of one hash P:unique: an entry found there is
-- still honoured, and moved to its string key when an enqueue meets it.
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
-- The record of a task that left its queue: its payload goes, its events stay (for
-- `ttl` ms when > 0). `fields` are written with the state in one HSET.
local function close_record(k, state, fields, ttl)
  fields[#fields + 1] = 's'
  fields[#fields + 1] = state
  if state == 'd' then
    fields[#fields + 1] = 'd'
    fields[#fields + 1] = ''
  end
  redis.call('HSET', k, unpack(fields))
  if state == 'd' and ttl > 0 then redis.call('PEXPIRE', k, ttl) end
end
-- Settle a held task: done (its record closed) or a dead letter (kept, by failure
-- time). `f` = HMGET s t q u ut; `fields` go into the record's one HSET.
local function settle(id, f, failed, now, fields, ttl)
  redis.call('ZREM', qkey(f[3]), id)
  settle_unique(id, f[4], tonumber(f[5]) or 0)
  if failed then
    redis.call('ZADD', fkey(f[3]), now, id)
    close_record(tkey(id), 'f', fields, 0)
  else
    close_record(tkey(id), 'd', fields, ttl)
  end
end
