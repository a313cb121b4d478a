-- ARGV: P, worker id, payload, ttl_ms
redis.call('HSET', P .. 'workers', ARGV[2], ARGV[3])
redis.call('ZADD', P .. 'workers:ttl', now_ms() + tonumber(ARGV[4]), ARGV[2])
return 1
