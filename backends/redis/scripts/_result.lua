-- Store a result unless one is there (SET NX; an expired one is gone already, PXAT),
-- index it for cleanup and announce it on its channel -> true when it is the stored
-- outcome: stored now, or the same bytes found (this very write sent again, after
-- its reply was lost: announced once). The index P:ri holds "x<id>" by expiry time
-- and "f<id>" by minus the finish time (one ZADD for both).
local function store_result(id, payload, finished, exp)
  local k = P .. 'r:' .. id
  local stored
  if exp > 0 then
    stored = redis.call('SET', k, payload, 'NX', 'PXAT', exp)
  else
    stored = redis.call('SET', k, payload, 'NX')
  end
  if not stored then return redis.call('GET', k) == payload end
  if exp > 0 then
    redis.call('ZADD', P .. 'ri', exp, 'x' .. id, -finished, 'f' .. id)
  else
    redis.call('ZADD', P .. 'ri', -finished, 'f' .. id)
  end
  redis.call('PUBLISH', k, payload)
  return true
end
