-- intake_add.lua: buffer images an event told about, once per window run, while the window is open.
-- KEYS[1]  the buffer of one run and bucket (a list of "arrived_ms|[key, etag]")
-- KEYS[2]  the zset of non-empty buffers ("run|bucket" -> arrival of the oldest waiting item, ms)
-- KEYS[3]  the run's set of identities already taken (a replayed event adds nothing)
-- KEYS[4]  the run's hash (state, buffered)
-- ARGV[1]  the buffer's member in KEYS[2]: "run|bucket"
-- ARGV[2]  now, ms
-- ARGV[3..]  identity, item JSON ('["key", "etag"]') pairs
-- Returns  how many were buffered (the rest were already in this run); -1 the window is closed or its run
--          cannot take more (failed).
local state = redis.call('HGET', KEYS[4], 'state')
local open = state == 'listing' or (state == 'paused_budget' and redis.call('HGET', KEYS[4], 'listed') ~= '1')
if not open then return -1 end
local added = 0
for i = 3, #ARGV, 2 do
  if redis.call('SADD', KEYS[3], ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[1], ARGV[2] .. '|' .. ARGV[i + 1])
    added = added + 1
  end
end
if added > 0 then
  redis.call('HINCRBY', KEYS[4], 'buffered', added)
  redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1])
end
return added
