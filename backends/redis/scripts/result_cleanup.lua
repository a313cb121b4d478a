-- ARGV: P, limit, expires_ms (inclusive), finished_before_ms (exclusive, '' = unused)
-- -> results removed. P:ri: "x<id>" by expiry, "f<id>" by minus the finish time;
-- ri:expiry and ri:finished are the indexes written before issue 10 (drained here).
local limit = tonumber(ARGV[2])
local function drop(id)
  redis.call('DEL', P .. 'r:' .. id)
  redis.call('ZREM', P .. 'ri', 'x' .. id, 'f' .. id)
  redis.call('ZREM', P .. 'ri:expiry', id)
  redis.call('ZREM', P .. 'ri:finished', id)
end
local function sweep(key, lo, hi, n, strip)
  local members = redis.call('ZRANGEBYSCORE', key, lo, hi, 'LIMIT', 0, n)
  for _, m in ipairs(members) do drop(strip and string.sub(m, 2) or m) end
  return #members
end
local n = sweep(P .. 'ri', 0, ARGV[3], limit, true)
if n < limit then n = n + sweep(P .. 'ri:expiry', '-inf', ARGV[3], limit - n, false) end
if ARGV[4] ~= '' then
  local before = tonumber(ARGV[4])
  if n < limit then n = n + sweep(P .. 'ri', '(' .. -before, '(0', limit - n, true) end
  if n < limit then
    n = n + sweep(P .. 'ri:finished', '-inf', '(' .. before, limit - n, false)
  end
end
return n
