-- buy_failed.lua: a purchase request ends without a token. `failed`: it certainly did not happen (never sent, or
-- refused): both commitments go back. `unknown`: it left and no usable answer came back, so it may have been
-- charged: it stays charged to the day and to the run it was made for (counted as an unknown purchase) and is
-- never repeated blindly; after a few in a row the run is paused for a person, with the reason.
-- KEYS[1]  the purchase request's hash
-- KEYS[2]  the zset of open purchase requests
-- KEYS[3]  the UTC day's hash the request was charged to (its `day` field)
-- KEYS[4]  the run's hash (unused when the request has no run)
-- KEYS[5]  wallet totals hash
-- ARGV[1]  request id
-- ARGV[2]  'failed' or 'unknown'
-- ARGV[3]  unknown purchases in a row that pause the run (0: never)
-- ARGV[4]  the pause reason (what the seller answered)
-- ARGV[5]  the payment id the answer named, '' if none (kept for a person reconciling with the seller)
-- Returns  1 if the request was open and is now settled, 2 if so and it paused the run, else 0.
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'requested' then return 0 end
local price = tonumber(redis.call('HGET', KEYS[1], 'price_cents') or '0')
local run = redis.call('HGET', KEYS[1], 'run_id') or ''
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'updated_ms', now)
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'payment_id', ARGV[5]) end
-- Kept a week for a person asking what happened to that money, then gone.
redis.call('PEXPIRE', KEYS[1], 7 * 24 * 3600 * 1000)
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] == 'failed' then
  redis.call('HINCRBY', KEYS[3], 'bought_cents', -price)
  if run ~= '' then redis.call('HINCRBY', KEYS[4], 'committed_cents', -price) end
  return 1
end
redis.call('HINCRBY', KEYS[5], 'unknown_purchases', 1)
redis.call('HINCRBY', KEYS[5], 'unknown_cents', price)
-- Fleet-wide too: the pool keeper buys nothing ahead of need past ARGV[3] of these in a row (Ledger.refill).
redis.call('HINCRBY', KEYS[5], 'unknown_in_row', 1)
if run == '' then return 1 end
redis.call('HINCRBY', KEYS[4], 'unknown_purchases', 1)
redis.call('HINCRBY', KEYS[4], 'unknown_purchase_cents', price)
local in_row = redis.call('HINCRBY', KEYS[4], 'unknown_in_row', 1)
local limit = tonumber(ARGV[3])
local run_state = redis.call('HGET', KEYS[4], 'state')
if limit > 0 and in_row >= limit and (run_state == 'listing' or run_state == 'running') then
  redis.call('HSET', KEYS[4], 'state', 'paused', 'pause_reason', ARGV[4])
  return 2
end
return 1
