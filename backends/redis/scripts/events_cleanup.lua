-- Remove events stamped before `before`: those of P:e:old, then the head of the
-- stream (from `start`), whose entries name their task and event.
-- ARGV: P, limit, before_ms, start ('-' or '(<stream id>')
-- -> {stream entries looked at, events removed, last stream id looked at}
local limit, before = tonumber(ARGV[2]), tonumber(ARGV[3])
local stream = P .. 'e:all'
local removed = 0
local function remove(tid, evid, gid)
  if tid and evid then redis.call('HDEL', tkey(tid), 'e:' .. evid) end
  removed = removed + redis.call('XDEL', stream, gid)
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', P .. 'e:old', '-inf', '(' .. before,
                              'LIMIT', 0, limit)) do
  local tid, evid, gid = string.match(m, '^(%S+) (.+) (%S+)$')
  remove(tid, evid, gid)
  redis.call('ZREM', P .. 'e:old', m)
end
local rows = redis.call('XRANGE', stream, ARGV[4], '(' .. before .. '-0', 'COUNT', limit)
local last = ''
for _, row in ipairs(rows) do
  last = row[1]
  local payload
  for i = 1, #row[2], 2 do
    if row[2][i] == 'd' then payload = row[2][i + 1] end
  end
  local ok, ev = pcall(cjson.decode, payload or '')
  local ts = ok and type(ev) == 'table' and tonumber(ev.timestamp)
  if not ts or ts * 1000 < before then
    if ok and type(ev) == 'table' then
      remove(ev.task_id, ev.id, row[1])
    else
      remove(nil, nil, row[1])
    end
  end
end
return {#rows, removed, last}
