-- ARGV: P, id, payload, finished_ms, expires_ms (0 = never) -> 1 stored (or this very
-- result found: a write sent again), 0 another outcome is there (kept)
local ok = store_result(ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
if ok then return 1 end
return 0
