-- Dead letters, newest failure first, read through the queues' indexes by failure
-- time (P:q:<q>:failed, ms): each queue gives at most `limit` ids in the time range,
-- the merge keeps the newest `limit` (ties by id, newest first), and only those
-- records are read. An index entry whose record is no dead letter any more (gone by
-- hand or by eviction) is dropped and the page read again.
-- ARGV: P, limit, queue ('' = all), since ms (inclusive, '' = none), before ms
-- (exclusive, '' = none) -> flat {id, failed ms, payload, queue, ...}
local limit, queue = tonumber(ARGV[2]), ARGV[3]
local lo = ARGV[4] == '' and '-inf' or ARGV[4]
local hi = ARGV[5] == '' and '+inf' or '(' .. ARGV[5]
local queues = {queue}
if queue == '' then queues = redis.call('SMEMBERS', P .. 'queues') end

local function newest()
  local found = {}
  for _, q in ipairs(queues) do
    local rows = redis.call('ZREVRANGEBYSCORE', fkey(q), hi, lo, 'WITHSCORES',
                            'LIMIT', 0, limit)
    for i = 1, #rows, 2 do found[#found + 1] = {rows[i], tonumber(rows[i + 1]), q} end
  end
  if #queues > 1 then
    table.sort(found, function(a, b)
      if a[2] ~= b[2] then return a[2] > b[2] end
      return a[1] > b[1]
    end)
  end
  return found
end

local function page()
  local out, stale = {}, 0
  local found = newest()
  for i = 1, math.min(limit, #found) do
    local id, at, q = found[i][1], found[i][2], found[i][3]
    local f = redis.call('HMGET', tkey(id), 's', 'd')
    if f[1] == 'f' and f[2] and f[2] ~= '' then
      for _, v in ipairs({id, at, f[2], q}) do out[#out + 1] = v end
    else
      redis.call('ZREM', fkey(q), id)
      stale = stale + 1
    end
  end
  return out, stale
end

local out, stale = page()
while stale > 0 do out, stale = page() end
return out
