-- Enqueue a task, with its ENQUEUED event when one is given (the fused submit).
-- ARGV: P, id, payload, queue, priority, eta_ms (0 = none), unique key ('' = none),
-- unique_ttl_ms, max_retries, expires_ms ('' = none), event id ('' = none),
-- event payload, stream maxlen, register ('1': add the queue to P:queues, which the
-- client does once per queue and process), after ('1': the task waits for others,
-- so a claim stores no STARTED for it) -> the id of the task that holds the place.
--
-- A new task costs EVALSHA + HSET + XADD + ZADD: the HSET's count of new fields
-- tells a new record from a known one, so nothing is read first. The HSET writes only
-- what a re-sent enqueue writes identically (never the state), and the event field's
-- order key is 0 (an ENQUEUED of a new record sorts before its task's other events).
-- A known record (a re-send, a dead letter queued again, a unique key) takes the
-- slower path below.
local id, q, prio, eta, u = ARGV[2], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local evid, ev, maxlen = ARGV[11], ARGV[12], ARGV[13]
local k = tkey(id)
local TASK_FIELDS = 7
if ARGV[14] == '1' then redis.call('SADD', P .. 'queues', q) end
local fields = {'d', ARGV[3], 'q', q, 'p', ARGV[5], 'mr', ARGV[9], 'x', ARGV[10],
                'u', u, 'ut', ARGV[8]}
if ARGV[15] == '1' then
  -- Only on tasks that have it: every other record stays as before issue 11.
  fields[#fields + 1] = 'af'
  fields[#fields + 1] = '1'
  TASK_FIELDS = 8
end

-- Into the ready band, or the timer band while its ETA is ahead.
local function place(now)
  if eta > 0 and eta > now then
    redis.call('ZADD', qkey(q), eta, id)
  else
    redis.call('ZADD', qkey(q), READY - prio, id)
  end
end

-- The event (when given, and not stored yet) or a wake-up; the server time in ms.
local function announce(event_is_new, order_of)
  if evid ~= '' and event_is_new then
    local gid = xadd_event(maxlen, ev, q)
    if order_of then redis.call('HSET', k, 'e:' .. evid, gid .. ' ' .. ev) end
    return gid_ms(gid)
  end
  return gid_ms(wake(q))
end

-- Queue the task from scratch: a first enqueue of a unique task, a dead letter
-- queued again, or an id whose task finished.
local function from_scratch(old_state, event_is_new)
  if old_state == 'f' then redis.call('ZREM', fkey(q), id) end
  local all = {'s', 'w', 'a', 0, 't', ''}
  for i = 1, 2 * TASK_FIELDS do all[#all + 1] = fields[i] end
  redis.call('HSET', k, unpack(all))
  redis.call('PERSIST', k)
  place(announce(event_is_new, true))
  return id
end

if u == '' then
  if evid ~= '' then
    fields[#fields + 1] = 'e:' .. evid
    fields[#fields + 1] = '0 ' .. ev
  end
  local added = redis.call('HSET', k, unpack(fields))
  if added >= TASK_FIELDS then  -- no task had this id (events alone may have)
    local now = announce(added > TASK_FIELDS, false)
    if evid == '' or added == TASK_FIELDS then
      -- Its events were written before the task (the generic path): a record
      -- that the event store may have given a TTL.
      redis.call('PERSIST', k)
    end
    place(now)
    return id
  end
  local s = redis.call('HGET', k, 's')
  if s == 'f' or (s == 'd' and added > 0) then
    -- A dead letter, or a finished task enqueued again under a new event.
    return from_scratch(s, added > 0)
  end
  -- Unfinished (left alone), or this very enqueue sent again: undo what differs.
  if s == 'd' then redis.call('HSET', k, 'd', '') end
  if added > 0 and evid ~= '' then redis.call('HDEL', k, 'e:' .. evid) end
  return id
end

-- A unique key: the holder's state decides, so the record is read first.
local old = redis.call('HMGET', k, 's', 'q', 'e:' .. evid)
if old[2] and old[1] ~= 'f' and old[1] ~= 'd' then return id end
local holder = unique_holder(u)
if holder and holder ~= id then
  -- Held: by an unfinished task, or (with a TTL) for unique_ttl after it finished.
  if redis.call('PTTL', ukey(u)) > 0 then return holder end
  local hs = redis.call('HMGET', tkey(holder), 's', 'q')
  if hs[2] and hs[1] ~= 'f' and hs[1] ~= 'd' then return holder end
end
redis.call('SET', ukey(u), id)
return from_scratch(old[1], evid ~= '' and not old[3])
