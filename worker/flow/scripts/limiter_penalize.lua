-- limiter_penalize.lua: the seller throttled a call: cut the effective rate and make everyone wait out the
-- Retry-After together. Several workers throttled by the same burst count once (decreases `guard` apart).
-- KEYS[1]  the TAT key (unused; passed so every limiter script names the same keys)
-- KEYS[2]  the limiter's state hash
-- ARGV[1]  ceiling rate     ARGV[3]  decrease factor (e.g. 0.85)     ARGV[5]  wait, us (0 = one emission)
-- ARGV[2]  floor rate       ARGV[4]  guard between decreases, us
-- Returns  the new effective rate (as a string).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ceiling, floor = tonumber(ARGV[1]), tonumber(ARGV[2])
local rate = tonumber(redis.call('HGET', KEYS[2], 'rate') or ARGV[1])
if rate > ceiling then rate = ceiling end
local last = tonumber(redis.call('HGET', KEYS[2], 'last_decrease') or '0')
if now - last >= tonumber(ARGV[4]) then
  rate = math.max(floor, rate * tonumber(ARGV[3]))
  redis.call('HSET', KEYS[2], 'rate', tostring(rate), 'last_decrease', now)
  redis.call('HINCRBY', KEYS[2], 'decreases', 1)
end
local wait = tonumber(ARGV[5])
if wait <= 0 then wait = 1000000 / rate end
local until_us = now + wait
if until_us > tonumber(redis.call('HGET', KEYS[2], 'cooldown_until') or '0') then
  redis.call('HSET', KEYS[2], 'cooldown_until', string.format('%.0f', until_us))
end
redis.call('HINCRBY', KEYS[2], 'throttled', 1)
return tostring(rate)
