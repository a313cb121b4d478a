-- Queue a held task again, now or after a delay (the attempt count stays).
-- ARGV: P, id, token, delay_ms -> 1 queued (or queued already by this token), 0 not held
local id = ARGV[2]
local k = tkey(id)
local f = redis.call('HMGET', k, 's', 't', 'q', 'p')
if f[2] ~= ARGV[3] then return 0 end
if f[1] == 'w' then return 1 end
if f[1] ~= 'r' then return 0 end
local delay = tonumber(ARGV[4])
local now = gid_ms(wake(f[3]))
if delay > 0 then
  redis.call('ZADD', qkey(f[3]), 'XX', now + delay, id)
  redis.call('HSET', k, 's', 'w')
else
  redis.call('ZADD', qkey(f[3]), 'XX', READY - tonumber(f[4]), id)
  redis.call('HSET', k, 's', 'w', 'rs', now)
end
return 1
