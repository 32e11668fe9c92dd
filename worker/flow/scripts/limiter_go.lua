-- limiter_go.lua: a call at its reserved time: unless the seller said 'too fast' meanwhile, it takes an in-flight
-- slot (leased, so a dead worker's slot lapses; Redis clock). The cap is fixed, none, or 'auto': Little's law,
-- the ceiling rate times the seller's learned latency, with headroom.
-- KEYS[1]  the limiter's state hash (cooldown_until, and the learned latency under ARGV[5])
-- KEYS[2]  the zset of slots (member -> expiry, ms)
-- KEYS[3]  the zset of callers waiting for a slot (member -> registration expiry, ms)
-- ARGV[1]  the cap: a number (0 = none) or 'auto'
-- ARGV[2]  this slot's member name
-- ARGV[3]  lease, ms
-- ARGV[4]  ceiling rate, calls/s      ARGV[5] the latency field      ARGV[6] latency assumed until learned, ms
-- ARGV[7]  headroom factor            ARGV[8] least auto cap          ARGV[9] greatest auto cap
-- ARGV[10] '1' when this caller registered as waiting before
-- Returns  {1, cap} go; {0, wait_ms, 'cooldown'} take a new place after wait_ms; {0, wait_ms, 'full'} wait for a
--          slot to be given back (registered as waiting), at most wait_ms (when the first slot lapses).
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
local state = redis.call('HMGET', KEYS[1], 'cooldown_until', ARGV[5])
local cooldown = tonumber(state[1] or '0')
if cooldown > now_us then return {0, math.ceil((cooldown - now_us) / 1000), 'cooldown'} end
local cap
if ARGV[1] == 'auto' then
  local latency = tonumber(state[2] or ARGV[6])
  cap = math.ceil(tonumber(ARGV[4]) * latency / 1000 * tonumber(ARGV[7]))
  cap = math.max(tonumber(ARGV[8]), math.min(tonumber(ARGV[9]), cap))
else
  cap = tonumber(ARGV[1])
end
if cap <= 0 then return {1, 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= cap then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local wait = math.max(1, tonumber(first[2]) - now)
  redis.call('ZADD', KEYS[3], now + wait + 1000, ARGV[2])
  return {0, wait, 'full'}
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
if ARGV[10] == '1' then redis.call('ZREM', KEYS[3], ARGV[2]) end
return {1, cap}
