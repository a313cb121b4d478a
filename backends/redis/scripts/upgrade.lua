-- Move queued tasks of the layout before issue 10 (zsets P:q:<q>:ready with
-- "<16 hex seq><id>" members, :delayed and :leases, wake lists, P:seq) into the
-- queue's one zset, `limit` at a time. ARGV: P, limit -> 1 more to do, 0 done (and
-- P:layout is then 2).
local limit = tonumber(ARGV[2])
local moved = 0
for _, q in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  for _, kind in ipairs({'ready', 'delayed', 'leases'}) do
    local key = qkey(q) .. ':' .. kind
    local items = redis.call('ZRANGE', key, 0, limit - moved - 1, 'WITHSCORES')
    for i = 1, #items, 2 do
      local m, score = items[i], tonumber(items[i + 1])
      local id = m
      if kind == 'ready' then
        id = string.sub(m, 17)
        score = READY + score
      end
      local k = tkey(id)
      local f = redis.call('HMGET', k, 's', 'mr', 'x')
      if f[1] == 's' then redis.call('HSET', k, 's', 'w') end
      if not f[2] then redis.call('HSET', k, 'mr', '', 'x', '') end
      redis.call('HDEL', k, 'm')
      redis.call('ZADD', qkey(q), score, id)
      redis.call('ZREM', key, m)
      moved = moved + 1
    end
    if moved >= limit then return 1 end
  end
  redis.call('DEL', qkey(q) .. ':wake')
end
redis.call('DEL', P .. 'seq')
redis.call('SET', P .. 'layout', '2')
return 0
