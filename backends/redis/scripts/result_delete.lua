-- ARGV: P, id -> 1 if a result was there
local id = ARGV[2]
redis.call('ZREM', P .. 'ri', 'x' .. id, 'f' .. id)
redis.call('ZREM', P .. 'ri:expiry', id)  -- the indexes before issue 10
redis.call('ZREM', P .. 'ri:finished', id)
return redis.call('DEL', P .. 'r:' .. id)
