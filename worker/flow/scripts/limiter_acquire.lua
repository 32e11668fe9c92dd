-- limiter_acquire.lua: GCRA admission at the effective rate, on the Redis server's clock; shared by every worker.
-- KEYS[1]  the theoretical arrival time (TAT) key, microseconds
-- KEYS[2]  the limiter's state hash (rate, cooldown_until)
-- ARGV[1]  the ceiling rate, calls per second (the effective rate never exceeds it)
-- ARGV[2]  burst: calls that may go back to back
-- Returns  {1, 0} admitted; {0, wait_us} not yet: ask again after wait_us.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cooldown = tonumber(redis.call('HGET', KEYS[2], 'cooldown_until') or '0')
if cooldown > now then return {0, cooldown - now} end
local ceiling = tonumber(ARGV[1])
local rate = tonumber(redis.call('HGET', KEYS[2], 'rate') or ARGV[1])
if rate > ceiling then rate = ceiling end
local emission = 1000000 / rate
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + emission
local allow_at = new_tat - burst * emission
if allow_at > now then return {0, math.ceil(allow_at - now)} end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, 0}
