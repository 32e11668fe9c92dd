-- limiter_reward.lua: a call was answered: raise the effective rate a little towards the ceiling (AIMD).
-- KEYS[1]  the TAT key (unused)
-- KEYS[2]  the limiter's state hash
-- ARGV[1]  ceiling rate
-- ARGV[2]  step, as a fraction of the current rate
-- Returns  the new effective rate (as a string).
local ceiling = tonumber(ARGV[1])
local rate = tonumber(redis.call('HGET', KEYS[2], 'rate') or ARGV[1])
if rate < ceiling then
  rate = math.min(ceiling, rate * (1 + tonumber(ARGV[2])))
  redis.call('HSET', KEYS[2], 'rate', tostring(rate))
end
return tostring(rate)
