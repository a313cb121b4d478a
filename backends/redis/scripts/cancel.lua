-- Remove a task that waits (ready or scheduled); a running one stays.
-- ARGV: P, id, record ttl ms -> 1 cancelled, 0 not waiting
local id = ARGV[2]
local k = tkey(id)
local f = redis.call('HMGET', k, 's', 'q', 'u', 'd')
if not f[2] or not f[4] or f[4] == '' or (f[1] and f[1] ~= 'w') then return 0 end
if redis.call('ZREM', qkey(f[2]), id) == 0 then return 0 end
settle_unique(id, f[3], 0)
close_record(k, 'd', {}, tonumber(ARGV[3]))
return 1
