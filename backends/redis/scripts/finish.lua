-- The fused finish: the result (unless one is stored), then its outcome event (only
-- when this result is the stored one and the event is not stored yet), then the ack
-- fenced by the lease, all in one call.
-- ARGV: P, id, token, failed ('1'/'0'), result payload, finished_ms, expires_ms
-- (0 = never), event id, event payload, record ttl ms, stream maxlen
-- -> 1 when the result is the stored outcome, else 0.
local id, token, failed = ARGV[2], ARGV[3], ARGV[4] == '1'
local evid, ev, ttl, maxlen = ARGV[8], ARGV[9], tonumber(ARGV[10]), ARGV[11]
local k = tkey(id)
local f = redis.call('HMGET', k, 's', 't', 'q', 'u', 'ut', 'e:' .. evid)
-- An expired result wrote nothing on a miss with an earlier one.
local ok = store_result(id, ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]))
local fields, now = {}, nil
if ok and not f[6] then
  local gid = xadd_event(maxlen, ev)
  now = gid_ms(gid)
  fields = {'e:' .. evid, gid .. ' ' .. ev}
end
if f[1] == 'r' and f[2] == token then
  settle(id, f, failed, failed and (now or now_ms()) or 0, fields, ttl)
elseif #fields > 0 then
  redis.call('HSET', k, unpack(fields))
end
if ok then return 1 end
return 0
