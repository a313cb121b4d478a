-- Events of the layout before issue 10 (a list P:et:<task> per task, indexed by
-- P:e:index): removed as then. ARGV: P, limit, before_ms -> {tasks visited, removed}
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
