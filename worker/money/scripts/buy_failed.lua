-- buy_failed.lua: a purchase that certainly did not happen: its commitments go back to the day and the run
-- it was charged to.
-- KEYS[1]  the purchase request's hash
-- KEYS[2]  the zset of open purchase requests
-- KEYS[3]  the UTC day's hash the request was charged to (its `day` field)
-- KEYS[4]  the run's hash (unused when the request has no run)
-- KEYS[5]  wallet totals hash
-- ARGV[1]  request id
-- ARGV[2]  'failed' (certainly not bought: both commitments go back) or 'unknown' (may have been bought: the
--          day keeps it, counted as an unknown purchase; the run gets its commitment back, as no token came)
-- Returns  1 if the request was open and is now settled, else 0.
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'requested' then return 0 end
local price = tonumber(redis.call('HGET', KEYS[1], 'price_cents') or '0')
local run = redis.call('HGET', KEYS[1], 'run_id') or ''
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'updated_ms', now)
-- Kept a week for a person asking what happened to that money, then gone.
redis.call('PEXPIRE', KEYS[1], 7 * 24 * 3600 * 1000)
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] == 'failed' then
  redis.call('HINCRBY', KEYS[3], 'bought_cents', -price)
else
  redis.call('HINCRBY', KEYS[5], 'unknown_purchases', 1)
  redis.call('HINCRBY', KEYS[5], 'unknown_cents', price)
end
if run ~= '' then redis.call('HINCRBY', KEYS[4], 'committed_cents', -price) end
return 1
