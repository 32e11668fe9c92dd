-- intake_close.lua: an event window is over and nothing of it waits in a buffer: release its hold, so the
-- run finishes when its last chunk does. Atomic with intake_add, which refuses a closed window.
-- KEYS[1]  the run's hash
-- ARGV[1]  the hold taken at creation (1)
-- Returns  the chunks still pending (0: finalise now); -1 not open; -2 images still buffered.
if redis.call('HGET', KEYS[1], 'state') ~= 'listing' then return -1 end
if tonumber(redis.call('HGET', KEYS[1], 'buffered') or '0') > 0 then return -2 end
redis.call('HSET', KEYS[1], 'state', 'running', 'listed', '1')
return redis.call('HINCRBY', KEYS[1], 'pending', -tonumber(ARGV[1]))
