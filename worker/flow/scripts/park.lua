-- park.lua: keep a chunk message of a run paused (by its owner or for budget) until the run resumes.
-- KEYS[1]  the run's hash
-- KEYS[2]  the run's list of parked chunk messages
-- ARGV[1]  the chunk message (JSON)
-- Returns  1 parked; 0 the run is no longer paused (the caller sends the chunk on itself).
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'paused_budget' and state ~= 'paused' then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
