-- watermark_advance.lua: move a source's watermark forward, never back (two runs of one source ending out of
-- order must not undo the later one).
-- KEYS[1]  the source's watermark hash (ms, iso)
-- ARGV[1]  the new watermark in epoch milliseconds
-- ARGV[2]  the same instant as ISO-8601 UTC
-- Returns  1 if the watermark moved, 0 if it already was at or past ARGV[1].
local current = redis.call('HGET', KEYS[1], 'ms')
if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'ms', ARGV[1], 'iso', ARGV[2])
return 1
