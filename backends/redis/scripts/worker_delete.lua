-- ARGV: P, worker id
redis.call('HDEL', P .. 'workers', ARGV[2])
return redis.call('ZREM', P .. 'workers:ttl', ARGV[2])
