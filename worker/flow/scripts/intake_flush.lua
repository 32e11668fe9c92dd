-- intake_flush.lua: turn buffered images into a chunk of the window's run when a full call's worth waits, or
-- when the oldest has waited long enough; any number of listeners (and the watchdog) may call it.
-- KEYS[1]  the buffer of one run and bucket
-- KEYS[2]  the zset of non-empty buffers
-- KEYS[3]  the run's hash (chunks, pending, total, buffered)
-- KEYS[4]  the run's chunk items hash (seq -> {"bucket", "items"})
-- ARGV[1]  the buffer's member in KEYS[2]: "run|bucket"
-- ARGV[2]  now, ms
-- ARGV[3]  the longest an image may wait for others, ms
-- ARGV[4]  images per call
-- ARGV[5]  images per chunk at most
-- ARGV[6]  the bucket (JSON-encoded string)
-- Returns  {} nothing to send yet; else {seq, items JSON} of the new chunk (the caller enqueues it).
local n = redis.call('LLEN', KEYS[1])
if n == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {}
end
local per_call, most = tonumber(ARGV[4]), tonumber(ARGV[5])
local take = math.min(most, n - n % per_call)
if take == 0 then
  local oldest = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or ARGV[2])
  if tonumber(ARGV[2]) - oldest < tonumber(ARGV[3]) then return {} end
  take = math.min(n, most)
end
local raw = redis.call('LRANGE', KEYS[1], 0, take - 1)
redis.call('LTRIM', KEYS[1], take, -1)
local items = {}
for i, entry in ipairs(raw) do items[i] = string.match(entry, '^%d+|(.*)$') end
local json = '[' .. table.concat(items, ',') .. ']'
local seq = redis.call('HINCRBY', KEYS[3], 'chunks', 1) - 1
redis.call('HINCRBY', KEYS[3], 'pending', 1)
redis.call('HINCRBY', KEYS[3], 'total', take)
redis.call('HINCRBY', KEYS[3], 'buffered', -take)
redis.call('HSET', KEYS[4], seq, '{"bucket":' .. ARGV[6] .. ',"items":' .. json .. '}')
local head = redis.call('LINDEX', KEYS[1], 0)
if head then
  redis.call('ZADD', KEYS[2], 'XX', tonumber(string.match(head, '^(%d+)|')), ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return {seq, json}
