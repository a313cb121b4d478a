-- ARGV: P -> flat {queue, queued, scheduled, running, failed, oldest ready ms (-1), ...}
-- Ready tasks are counted by score; timers are told apart by their record (running
-- or scheduled), so this reads every timer's state: an admin call, not a hot path.
-- The oldest ready time is looked for among the first 1000 ready tasks (by order):
-- a moved task's "rs", else the time at the start of its id.
local now = now_ms()
local out = {}
local function ready_since(id, rs)
  if rs and rs ~= '' then return tonumber(rs) end
  local hex = string.gsub(string.sub(id, 1, 13), '-', '')
  return tonumber(hex, 16)
end
for _, q in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  local ready = redis.call('ZCOUNT', qkey(q), '-inf', '(0')
  local scheduled, running, due, oldest = 0, 0, 0, -1
  local timers = redis.call('ZRANGEBYSCORE', qkey(q), 0, '+inf', 'WITHSCORES')
  for i = 1, #timers, 2 do
    local f = redis.call('HMGET', tkey(timers[i]), 's', 'd')
    if f[1] == 'r' then
      running = running + 1
    elseif f[2] and f[2] ~= '' and f[1] ~= 'd' and f[1] ~= 'f' then
      if tonumber(timers[i + 1]) <= now then
        due = due + 1
        local since = tonumber(timers[i + 1])
        if oldest < 0 or since < oldest then oldest = since end
      else
        scheduled = scheduled + 1
      end
    end
  end
  local first = redis.call('ZRANGEBYSCORE', qkey(q), '-inf', '(0', 'LIMIT', 0, 1000)
  for _, id in ipairs(first) do
    local since = ready_since(id, redis.call('HGET', tkey(id), 'rs'))
    if since and (oldest < 0 or since < oldest) then oldest = since end
  end
  out[#out + 1] = q
  out[#out + 1] = ready + due
  out[#out + 1] = scheduled
  out[#out + 1] = running
  out[#out + 1] = redis.call('ZCARD', fkey(q))
  out[#out + 1] = oldest
end
return out
