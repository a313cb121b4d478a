-- Move a held lease's deadline. ARGV: P, id, token, lease_ms -> 1, or 0 not held
local f = redis.call('HMGET', tkey(ARGV[2]), 's', 't', 'q')
if f[1] ~= 'r' or f[2] ~= ARGV[3] then return 0 end
redis.call('ZADD', qkey(f[3]), 'XX', now_ms() + tonumber(ARGV[4]), ARGV[2])
return 1
