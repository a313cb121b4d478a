-- Drop waiting tasks (ready, scheduled) and dead letters; running ones stay.
-- ARGV: P, limit, queue ('' = all), record ttl ms -> {dropped, looked at}
local limit, ttl = tonumber(ARGV[2]), tonumber(ARGV[4])
local queues = {ARGV[3]}
if ARGV[3] == '' then queues = redis.call('SMEMBERS', P .. 'queues') end
local dropped, seen = 0, 0
local function drop(id)
  local k = tkey(id)
  local f = redis.call('HMGET', k, 's', 'u', 'd')
  if not f[3] or f[3] == '' or f[1] == 'r' or f[1] == 'd' then return false end
  settle_unique(id, f[2], 0)
  close_record(k, 'd', {}, ttl)
  return true
end
for _, q in ipairs(queues) do
  for _, key in ipairs({qkey(q), fkey(q)}) do
    local start = 0
    while seen < limit do
      local ids = redis.call('ZRANGE', key, start, start + limit - seen - 1)
      if #ids == 0 then break end
      for _, id in ipairs(ids) do
        seen = seen + 1
        if drop(id) then
          redis.call('ZREM', key, id)
          dropped = dropped + 1
        else
          start = start + 1  -- running: kept in place
        end
      end
    end
  end
end
return {dropped, seen}
