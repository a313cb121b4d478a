-- Hand a held task back without counting the attempt.
-- ARGV: P, id, token -> 1 released, 0 not held
local id = ARGV[2]
local k = tkey(id)
local f = redis.call('HMGET', k, 's', 't', 'q', 'p', 'a')
if f[1] ~= 'r' or f[2] ~= ARGV[3] then return 0 end
local now = gid_ms(wake(f[3]))
redis.call('ZADD', qkey(f[3]), 'XX', READY - tonumber(f[4]), id)
redis.call('HSET', k, 's', 'w', 't', '', 'a', math.max(0, (tonumber(f[5]) or 0) - 1), 'rs', now)
return 1
