-- Hand a held task back without counting the attempt, ready now or after a delay (a
-- task waiting for the tasks it depends on: a timer meanwhile, so stats count it as
-- scheduled). The wake-up tells idle workers, whose next claim learns when it is due.
-- ARGV: P, id, token, delay_ms -> 1 released, 0 not held (a release sent again finds
-- the token cleared: the attempt is given back once)
local id = ARGV[2]
local k = tkey(id)
local f = redis.call('HMGET', k, 's', 't', 'q', 'p', 'a')
if f[1] ~= 'r' or f[2] ~= ARGV[3] then return 0 end
local delay = tonumber(ARGV[4]) or 0
local now = gid_ms(wake(f[3]))
local attempts = math.max(0, (tonumber(f[5]) or 0) - 1)
if delay > 0 then
  redis.call('ZADD', qkey(f[3]), 'XX', now + delay, id)
  redis.call('HSET', k, 's', 'w', 't', '', 'a', attempts)
else
  redis.call('ZADD', qkey(f[3]), 'XX', READY - tonumber(f[4]), id)
  redis.call('HSET', k, 's', 'w', 't', '', 'a', attempts, 'rs', now)
end
return 1
