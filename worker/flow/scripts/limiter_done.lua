-- limiter_done.lua: a call ended: its in-flight slot is given back (waking one caller waiting for a slot, if
-- any); an answered call teaches the limiter the seller's latency and raises the effective rate a little
-- towards the ceiling (AIMD).
-- KEYS[1]  the limiter's state hash
-- KEYS[2]  the zset of slots
-- KEYS[3]  the zset of callers waiting for a slot
-- KEYS[4]  the list a waiting caller blocks on (BLPOP)
-- ARGV[1]  the slot's member name ('' for none)
-- ARGV[2]  the call's latency, ms ('' when it was not answered)
-- ARGV[3]  the latency field       ARGV[4] the EWMA weight of a new latency
-- ARGV[5]  ceiling rate            ARGV[6] step, as a fraction of the current rate ('' when not adaptive)
-- Returns  the effective rate (as a string).
if ARGV[1] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  if redis.call('ZCARD', KEYS[3]) > 0 then
    local t = redis.call('TIME')
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
    if redis.call('ZCARD', KEYS[3]) > 0 then
      redis.call('LPUSH', KEYS[4], '1')
      redis.call('PEXPIRE', KEYS[4], 10000)
    end
  end
end
local ceiling = tonumber(ARGV[5])
local state = redis.call('HMGET', KEYS[1], 'rate', ARGV[3])
local rate = tonumber(state[1] or ARGV[5])
if ARGV[2] == '' then return tostring(rate) end
local latency = tonumber(ARGV[2])
local before = tonumber(state[2] or '')
if before then latency = before + tonumber(ARGV[4]) * (latency - before) end
if ARGV[6] ~= '' and rate < ceiling then
  rate = math.min(ceiling, rate * (1 + tonumber(ARGV[6])))
  redis.call('HSET', KEYS[1], ARGV[3], string.format('%.1f', latency), 'rate', tostring(rate))
else
  redis.call('HSET', KEYS[1], ARGV[3], string.format('%.1f', latency))
end
return tostring(rate)
