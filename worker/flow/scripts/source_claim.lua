-- source_claim.lua: compare-and-set of the run that holds a source (single flight of scheduled scans): the
-- caller decides whether the holder it saw is still active, then replaces exactly that holder.
-- KEYS[1]  the source's holder (a string: a run id)
-- ARGV[1]  the run id that wants the source
-- ARGV[2]  the holder the caller saw and judged inactive ('' for none)
-- Returns  '' when ARGV[1] now holds the source, else the holder found (the caller judges it and retries).
local current = redis.call('GET', KEYS[1]) or ''
if current == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1])
  return ''
end
return current
