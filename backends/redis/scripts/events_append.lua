-- Append events, each once: an event whose id is stored for its task already (a
-- write sent again after a lost reply) is dropped.
-- ARGV: P, maxlen, record ttl ms (0 = none), then (task id, event id, payload, ts_ms)
-- per event -> 1.
-- Events live in their task's record (field "e:<event id>" = "<stream id> <payload>",
-- so the stream order is the stored order) and in the stream P:e:all. A record
-- without a task in it (or whose task finished) lives `ttl` after its last event.
-- An event stamped more than a minute before it was stored goes into P:e:old, by
-- its timestamp, so that cleanup finds it (cleanup walks the stream from its head).
local maxlen, ttl = ARGV[2], tonumber(ARGV[3])
local tasks, order = {}, {}
for i = 4, #ARGV, 4 do
  local tid = ARGV[i]
  local t = tasks[tid]
  if not t then
    t = {names = {'s', 'd'}, at = {}, fields = {}, added = {}}
    tasks[tid] = t
    order[#order + 1] = tid
  end
  t.names[#t.names + 1] = 'e:' .. ARGV[i + 1]
  t.at[i] = #t.names
end
for _, tid in ipairs(order) do
  local t = tasks[tid]
  t.f = redis.call('HMGET', tkey(tid), unpack(t.names))
end
for i = 4, #ARGV, 4 do
  local t = tasks[ARGV[i]]
  local j = t.at[i]
  if not t.f[j] and not t.added[t.names[j]] then
    t.added[t.names[j]] = true  -- a second copy in this same call is dropped too
    local gid = xadd_event(maxlen, ARGV[i + 2])
    t.fields[#t.fields + 1] = t.names[j]
    t.fields[#t.fields + 1] = gid .. ' ' .. ARGV[i + 2]
    if tonumber(ARGV[i + 3]) < gid_ms(gid) - 60000 then
      redis.call('ZADD', P .. 'e:old', ARGV[i + 3], ARGV[i] .. ' ' .. ARGV[i + 1] .. ' ' .. gid)
    end
  end
end
for _, tid in ipairs(order) do
  local t = tasks[tid]
  if #t.fields > 0 then
    redis.call('HSET', tkey(tid), unpack(t.fields))
    local live = t.f[2] and t.f[2] ~= '' and t.f[1] ~= 'd'
    if ttl > 0 and not live then redis.call('PEXPIRE', tkey(tid), ttl) end
  end
end
return 1
