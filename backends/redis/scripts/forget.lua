-- Delete dead letters as a purge does: out of their queue's failure index, their
-- unique key freed, the record closed (its events live `ttl` more). Other tasks are
-- left alone, so a forget sent again deletes nothing twice.
-- ARGV: P, record ttl ms, ids... -> how many were deleted
local ttl = tonumber(ARGV[2])
local n = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local k = tkey(id)
  local f = redis.call('HMGET', k, 's', 'q', 'u')
  if f[1] == 'f' and f[2] then
    redis.call('ZREM', fkey(f[2]), id)
    settle_unique(id, f[3], 0)
    close_record(k, 'd', {}, ttl)
    n = n + 1
  end
end
return n
