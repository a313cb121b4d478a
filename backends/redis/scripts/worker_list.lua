-- ARGV: P -> payloads of live workers (the expired ones are dropped)
local now = now_ms()
local dead = redis.call('ZRANGEBYSCORE', P .. 'workers:ttl', '-inf', now)
for _, id in ipairs(dead) do redis.call('HDEL', P .. 'workers', id) end
redis.call('ZREMRANGEBYSCORE', P .. 'workers:ttl', '-inf', now)
return redis.call('HVALS', P .. 'workers')
