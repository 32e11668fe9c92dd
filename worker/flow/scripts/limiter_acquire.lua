-- limiter_acquire.lua: GCRA admission at the effective rate, on the Redis server's clock; shared by every worker.
-- Event calls go first: while one waits (or event chunks wait in their queue), other calls are told to yield.
-- KEYS[1]  the theoretical arrival time (TAT) key, microseconds
-- KEYS[2]  the limiter's state hash (rate, cooldown_until)
-- KEYS[3]  the zset of event callers waiting for a slot (member -> registration expiry, ms)
-- KEYS[4]  the events queue (a list: event chunks not yet fetched by any worker)
-- ARGV[1]  the ceiling rate, calls per second (the effective rate never exceeds it)
-- ARGV[2]  burst: calls that may go back to back
-- ARGV[3]  '1' for an event call (urgent), '0' for any other
-- ARGV[4]  the urgent caller's member name ('' for others)
-- Returns  {1, 0} admitted; {0, wait_us} not yet: ask again after wait_us; {2, 0} yield to event work.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[3], now_ms + 10000, ARGV[4])
else
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[3]) > 0 or redis.call('LLEN', KEYS[4]) > 0 then return {2, 0} end
end
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
if ARGV[3] == '1' then redis.call('ZREM', KEYS[3], ARGV[4]) end
return {1, 0}
