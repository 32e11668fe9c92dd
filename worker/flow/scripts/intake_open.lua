-- intake_open.lua: the run of an event window, created once by whichever listener buffers into it first.
-- KEYS[1]  the run's hash
-- KEYS[2]  the zset of runs (run id -> created, seconds)
-- ARGV[1]  run id
-- ARGV[2]  now, seconds (the zset's score)
-- ARGV[3..]  field, value pairs of the new run (state 'listing', counters, window end, settings...)
-- Returns  1 created; 0 it existed already (nothing written).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
