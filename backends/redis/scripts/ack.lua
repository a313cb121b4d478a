-- Settle a task while the token holds its lease. A token that already settled it
-- this way (its reply was lost and the call is sent again) finds its own work done
-- for a dead letter, which keeps the token; a finished task's record says 'd'.
-- ARGV: P, id, token, failed ('1'/'0'), record ttl ms -> 1 settled, 0 not held
local id, failed = ARGV[2], ARGV[4] == '1'
local f = redis.call('HMGET', tkey(id), 's', 't', 'q', 'u', 'ut')
if f[2] ~= ARGV[3] then return 0 end
if f[1] == 'f' and failed then return 1 end
if f[1] ~= 'r' then return 0 end
settle(id, f, failed, failed and now_ms() or 0, {}, tonumber(ARGV[5]))
return 1
