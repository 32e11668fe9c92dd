-- pause.lua: running (or listing) -> paused_budget, with the reason.
-- KEYS[1]  the run's hash
-- ARGV[1]  the reason
-- Returns  1 paused now; 0 it was not running (already paused, failed or done).
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' and state ~= 'listing' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'paused_budget', 'pause_reason', ARGV[1])
return 1
