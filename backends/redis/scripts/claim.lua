-- Claim up to `limit` ready tasks under a lease; with `started`, store each one's
-- STARTED event too (the fused claim).
-- ARGV: P, lease_ms, claim id, worker id as JSON, timestamp as JSON, client time ms,
-- limit, sweep ('1': move due timers first), want cursors ('1'), stream maxlen,
-- started ('1'/'0'), record ttl ms, n, then n pairs (claim id, ms since it was sent)
-- of earlier calls that got no reply, then the queues.
-- -> {deliveries, checked, more, due, cursor, wake cursor}: deliveries flat, six per
-- task (payload, attempt, token, id, queue, started 0/1); `checked` = claim ids asked
-- about; `more` = 1 when ready tasks were left; `due` = ms until the first timer of
-- the queues (-1 none; valid when more = 0); the cursors ('' unless asked for, or
-- when an event was written) are stream ids no later than this call, for the
-- blocking wait of an idle worker.
--
-- The client chooses the claim id; the lease token of the i-th task is "<id>:<i>".
-- A claim whose reply was lost is found again by the next call, which names it: its
-- tasks are the running ones whose lease deadline falls where that claim put it
-- (between when it was sent and now, plus the lease) and whose token is its own.
-- Nothing is polled on a claim that finds work: the time comes from the first
-- STARTED's stream id (TIME only when no event is written), and due timers move to
-- ready only when the ready tasks ran out or the client asks for a sweep (about
-- once a second while busy).
local lease, cid, wid, ts = tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local cnow, limit, maxlen = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[10]
local write_started, ttl, n = ARGV[11] == '1', tonumber(ARGV[12]), tonumber(ARGV[13])
local first_queue = 14 + 2 * n
local now, cursor = nil, ''
local out, leased = {}, {}

local function server_now()
  if not now then now = now_ms() end
  return now
end

local function started_event(id, attempt, token, q)
  local evid = 'started:' .. id .. ':' .. attempt .. ':' .. token
  local ev = '{"v":FORMAT_VERSION,"id":"' .. evid .. '","task_id":"' .. id ..
    '","event_type":"started","timestamp":' .. ts .. ',"attempt":' .. attempt ..
    ',"worker_id":' .. wid .. ',"queue":"' .. q .. '","details":{}}'
  cursor = xadd_event(maxlen, ev)
  if not now then now = gid_ms(cursor) end
  return 'e:' .. evid, cursor .. ' ' .. ev
end

local function lease_of(q, id)
  local l = leased[q]
  if not l then
    l = {}
    leased[q] = l
  end
  l[#l + 1] = id
end

local function deliver(d, attempt, token, id, q, started)
  for _, v in ipairs({d, attempt, token, id, q, started and 1 or 0}) do out[#out + 1] = v end
end

-- Whether the worker runs it at once (omniq.storage.runs_now): a payload it can read,
-- attempts left, not expired, and not waiting for other tasks ("af", issue 11: the
-- worker writes its STARTED once they are done).
local function runs(f, attempt)
  if string.sub(f[1], 1, #TASK_PREFIX) ~= TASK_PREFIX then return false end
  if f[8] == '1' then return false end
  if f[4] and f[4] ~= '' and attempt > tonumber(f[4]) + 1 then return false end
  return not (f[5] and f[5] ~= '' and tonumber(f[5]) <= cnow)
end

-- A redelivered task whose result is stored: its worker died between the result and
-- the ack. Acked now (a dead letter when that result is not a success), not run.
local function settled(id, q, f, attempt, token)
  if attempt < 2 then return false end
  local r = redis.call('GET', P .. 'r:' .. id)
  if not r then return false end
  local ok = string.find(r, '"status":"completed"', 1, true) ~= nil
  settle(id, {'r', token, q, f[6], f[7]}, not ok, server_now(),
         {'a', attempt, 't', token}, ttl)
  return true
end

local function claim(q, id)
  local k = tkey(id)
  local f = redis.call('HMGET', k, 'd', 'a', 's', 'mr', 'x', 'u', 'ut', 'af')
  if not f[1] or f[1] == '' or f[3] == 'r' or f[3] == 'd' or f[3] == 'f' then
    redis.call('ZREM', qkey(q), id)  -- nothing to run under this entry
    return
  end
  local attempt = (tonumber(f[2]) or 0) + 1
  local token = cid .. ':' .. (#out / 6 + 1)
  if settled(id, q, f, attempt, token) then return end
  local fields = {'s', 'r', 't', token, 'a', attempt}
  local started = write_started and runs(f, attempt)
  if started then
    local field, value = started_event(id, attempt, token, q)
    fields[#fields + 1] = field
    fields[#fields + 1] = value
  end
  redis.call('HSET', k, unpack(fields))
  lease_of(q, id)
  deliver(f[1], attempt, token, id, q, started)
end

-- Due timers to ready: scheduled tasks, and running ones whose lease ran out (their
-- token is cleared, so the old holder's settlements fail).
local function sweep(q)
  local t = server_now()
  local due = redis.call('ZRANGEBYSCORE', qkey(q), 0, t, 'LIMIT', 0, 500)
  for _, id in ipairs(due) do
    local f = redis.call('HMGET', tkey(id), 's', 'p', 'd')
    if f[3] and f[3] ~= '' and (not f[1] or f[1] == 'w' or f[1] == 'r') then
      redis.call('ZADD', qkey(q), READY - (tonumber(f[2]) or 0), id)
      redis.call('HSET', tkey(id), 's', 'w', 't', '', 'rs', t)
    else
      redis.call('ZREM', qkey(q), id)
    end
  end
  return #due
end

local function refind(rcid, elapsed)
  local t = server_now()
  local lo, hi = t - elapsed - 2000 + lease, t + lease + 1000
  local mine = rcid .. ':'
  for i = first_queue, #ARGV do
    local q = ARGV[i]
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', qkey(q), lo, hi)) do
      local f = redis.call('HMGET', tkey(id), 's', 't', 'a', 'd')
      if f[1] == 'r' and string.sub(f[2] or '', 1, #mine) == mine then
        lease_of(q, id)
        -- Its STARTED (if any) is stored already, under the same id.
        deliver(f[4] or '', tonumber(f[3]), f[2], id, q, true)
      end
    end
  end
end

-- Ready tasks of one queue, in order; true when ready ones are left over. Claimed
-- entries keep their place until the lease ZADD at the end (a sweep may put due
-- ones before them): a second look skips them by name.
local function take(q, due)
  local mine = {}
  local kept = 0
  while true do
    local span = kept + limit - #out / 6 + 1
    local top = redis.call('ZRANGE', qkey(q), 0, span - 1, 'WITHSCORES')
    local again = false
    for i = 1, #top, 2 do
      local score = tonumber(top[i + 1])
      if score >= 0 then  -- the first timer: due now, or when
        if score <= server_now() then
          again = sweep(q) > 0
        elseif due[1] < 0 or score - server_now() < due[1] then
          due[1] = score - server_now()
        end
        break
      end
      if not mine[top[i]] then
        if #out / 6 >= limit then return true end
        local before = #out
        claim(q, top[i])
        if #out > before then
          mine[top[i]] = true
          kept = kept + 1
        end
      end
      -- All were ready and the range was full: more may follow.
      again = i == #top - 1 and #top == 2 * span
    end
    if not again then return false end
  end
end

for i = 1, n do refind(ARGV[12 + 2 * i], tonumber(ARGV[13 + 2 * i])) end
local more, due = 0, {-1}
if #out > 0 then
  more = 1  -- found again: the queues were not looked at
else
  for i = first_queue, #ARGV do
    if ARGV[8] == '1' then sweep(ARGV[i]) end
    if #out / 6 >= limit then
      more = 1
      break
    end
    if take(ARGV[i], due) then more = 1 end
  end
end
for q, ids in pairs(leased) do
  local deadline = server_now() + lease
  local pairs_ = {}
  for _, id in ipairs(ids) do
    pairs_[#pairs_ + 1] = deadline
    pairs_[#pairs_ + 1] = id
  end
  redis.call('ZADD', qkey(q), 'XX', unpack(pairs_))
end
local wake_cursor = ''
if ARGV[9] == '1' then
  if cursor == '' then
    local last = redis.call('XREVRANGE', P .. 'e:all', '+', '-', 'COUNT', 1)
    cursor = last[1] and last[1][1] or '0-0'
  end
  local last = redis.call('XREVRANGE', P .. 'wake', '+', '-', 'COUNT', 1)
  wake_cursor = last[1] and last[1][1] or '0-0'
end
return {out, n, more, due[1], cursor, wake_cursor}
