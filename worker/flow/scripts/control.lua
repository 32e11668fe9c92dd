-- control.lua: a run's owner (or a worker that met a setting a person must fix) pauses, cancels or fails it.
-- Payment scripts read the state this writes, so nothing is paid for the run once it returns.
-- KEYS[1]  the run's hash
-- KEYS[2]  the run's list of parked chunk messages
-- ARGV[1]  'pause' (listing/running -> paused), 'cancel' or 'fail' (any state not ended -> cancelled/failed)
-- ARGV[2]  the reason, kept as pause_reason or stop_reason
-- Returns  {1, state, parked...} changed (a cancel or fail returns the parked messages: the caller sends them
--          again so they wind down, then trims them); {0, state} nothing to do in that state.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, ''} end
if ARGV[1] == 'pause' then
  if state ~= 'listing' and state ~= 'running' then return {0, state} end
  redis.call('HSET', KEYS[1], 'state', 'paused', 'pause_reason', ARGV[2])
  return {1, 'paused'}
end
if state ~= 'listing' and state ~= 'running' and state ~= 'paused' and state ~= 'paused_budget' then
  return {0, state}
end
local to = ARGV[1] == 'cancel' and 'cancelled' or 'failed'
redis.call('HSET', KEYS[1], 'state', to, 'stop_reason', ARGV[2])
redis.call('HDEL', KEYS[1], 'pause_reason')
local out = {1, to}
for _, m in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do table.insert(out, m) end
return out
