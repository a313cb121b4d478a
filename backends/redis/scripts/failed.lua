-- Dead letters, newest failure first, read through the queues' indexes by failure
-- time (P:q:<q>:failed, ms): each queue gives at most limit + 1 ids in the time range,
-- the merge keeps the newest (ties by id, newest first), and only the records on the
-- page are read. A page never ends inside a group of dead letters that failed in the
-- same millisecond (a burst of failures shares a few): such a group comes whole, even
-- past `limit`, so that the next page, before= this page's last time, skips none.
-- An index entry whose record is no dead letter any more (gone by hand or by
-- eviction) is dropped and the page read again.
-- ARGV: P, limit, queue ('' = all), since ms (inclusive, '' = none), before ms
-- (exclusive, '' = none) -> flat {id, failed ms, payload, queue, ...}
local limit, queue = tonumber(ARGV[2]), ARGV[3]
local lo = ARGV[4] == '' and '-inf' or ARGV[4]
local hi = ARGV[5] == '' and '+inf' or '(' .. ARGV[5]
local queues = {queue}
if queue == '' then queues = redis.call('SMEMBERS', P .. 'queues') end

local function newer(a, b)
  if a[2] ~= b[2] then return a[2] > b[2] end
  return a[1] > b[1]
end

-- The newest n of every queue between `top` and `bottom` (n = nil: all), merged.
local function newest(top, bottom, n)
  local found = {}
  for _, q in ipairs(queues) do
    local rows
    if n then
      rows = redis.call('ZREVRANGEBYSCORE', fkey(q), top, bottom, 'WITHSCORES', 'LIMIT', 0, n)
    else
      rows = redis.call('ZREVRANGEBYSCORE', fkey(q), top, bottom, 'WITHSCORES')
    end
    for i = 1, #rows, 2 do found[#found + 1] = {rows[i], tonumber(rows[i + 1]), q} end
  end
  table.sort(found, newer)
  return found
end

local function candidates()
  local found = newest(hi, lo, limit + 1)
  if #found <= limit then return found end
  local last = found[limit][2]
  local page = {}
  for i = 1, limit do
    if found[i][2] > last then page[#page + 1] = found[i] end
  end
  if found[limit + 1][2] == last then
    -- The group at `last` goes on past the page: all of it, from every queue.
    for _, c in ipairs(newest(last, last, nil)) do page[#page + 1] = c end
  else
    for i = 1, limit do
      if found[i][2] == last then page[#page + 1] = found[i] end
    end
  end
  return page
end

local function page()
  local out, stale = {}, 0
  for _, c in ipairs(candidates()) do
    local id, at, q = c[1], c[2], c[3]
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
