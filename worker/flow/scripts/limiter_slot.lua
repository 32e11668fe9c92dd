-- limiter_slot.lua: the in-flight cap, with leased slots so a dead worker's slot expires (Redis clock).
-- KEYS[1]  the zset of slots (member -> expiry, ms)
-- ARGV[1]  the cap
-- ARGV[2]  this slot's member name
-- ARGV[3]  lease, ms
-- Returns  {1, 0} taken; {0, wait_ms} full: the first slot expires in wait_ms at the latest.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(first[2]) - now}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
return {1, 0}
