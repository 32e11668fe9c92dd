-- scan_chunk.lua: one listed chunk of a scan in one round trip: look its images up in the done-set, count the
-- judged ones as skipped, and keep the rest as the run's next chunk (number, counters, keys) as add_chunk.lua
-- does; nothing is written once the run is ending (cancelled or failed while the producer lists).
-- KEYS[1]    the run's hash (state, chunks, pending, total, skipped)
-- KEYS[2]    the run's chunk items hash (seq -> JSON {"bucket": ..., "items": [[key, etag], ...]})
-- KEYS[2+i]  the done-set shard of image i (KEYS[1] again where image i is not looked up)
-- ARGV[1]    the states in which nothing more is registered, space separated
-- ARGV[2]    the chunk document's JSON up to its items: {"bucket": "...", "items": [
-- ARGV[3]    n, the chunk's image count
-- ARGV[3+i]  image i's done-set field; empty: not looked up (a --force run, or no ETag: the worker checks it)
-- ARGV[3+n+i] image i's [key, etag] as JSON
-- Returns    {-2, state} when the run is ending; else {seq (-1: every image judged, no chunk), skipped, flags}
--            where flags holds one character per image: '1' to judge, '0' judged already.
local state = redis.call('HGET', KEYS[1], 'state')
for ending in string.gmatch(ARGV[1], '%S+') do
  if state == ending then return {-2, state} end
end
local n = tonumber(ARGV[3])
local flags, fresh = {}, {}
local skipped = 0
for i = 1, n do
  local field = ARGV[3 + i]
  local raw = false
  if field ~= '' then raw = redis.call('HGET', KEYS[2 + i], field) end
  -- A done-set entry starts with its verdict's code and a bar (claims.py DoneEntry); anything else is not one.
  if raw and string.find(raw, '^[LSN]|') then
    skipped = skipped + 1
    flags[i] = '0'
  else
    flags[i] = '1'
    fresh[#fresh + 1] = ARGV[3 + n + i]
  end
end
if skipped > 0 then redis.call('HINCRBY', KEYS[1], 'skipped', skipped) end
if #fresh == 0 then return {-1, skipped, table.concat(flags)} end
local seq = redis.call('HINCRBY', KEYS[1], 'chunks', 1) - 1
redis.call('HINCRBY', KEYS[1], 'pending', 1)
redis.call('HINCRBY', KEYS[1], 'total', #fresh)
redis.call('HSET', KEYS[2], seq, ARGV[2] .. table.concat(fresh, ', ') .. ']}')
return {seq, skipped, table.concat(flags)}
