-- buy_begin.lua: before a purchase leaves, write it down and commit its quoted price against the day's cap
-- and (for a purchase made for a run) the run's cap, in one step; nothing is written if a cap would be crossed.
-- KEYS[1]  the purchase request's hash (becomes {state=requested, ...})
-- KEYS[2]  the zset of open purchase requests (request id -> created ms)
-- KEYS[3]  the UTC day's hash (field bought_cents)
-- KEYS[4]  the run's hash (fields committed_cents, budget_cents); unused when ARGV[5] is ''
-- KEYS[5]  wallet totals hash (the pool's unknown purchases in a row)
-- ARGV[1]  request id
-- ARGV[2]  quoted price, cents
-- ARGV[3]  the day's cap in cents, -1 for none
-- ARGV[4]  the UTC day (YYYY-MM-DD) the price is charged to, kept so a release finds the same day
-- ARGV[5]  run id, '' for a purchase into the shared pool
-- ARGV[6]  unknown purchases in a row that pause the run (IRLIVE_MAX_UNKNOWN_PURCHASES; 0: no cap)
-- Returns  1 committed and written down; -1 the day's cap would be crossed; -2 the run's cap would be;
--          -3 its owner paused the run; -4 the run is cancelled, failed or done (nothing is bought for it);
--          -5 purchases still open could end unknown and carry the run (or the pool) past ARGV[6] in a row:
--          wait for them. A run paused for budget is held by the caps, checked below.
-- A run's purchase reads the run once (nothing below writes it before the reads are done).
local run = nil
if ARGV[5] ~= '' then
  run = redis.call('HMGET', KEYS[4], 'state', 'unknown_in_row', 'budget_cents', 'committed_cents')
  if run[1] == 'paused' then return -3 end
  if run[1] ~= 'listing' and run[1] ~= 'running' and run[1] ~= 'paused_budget' then return -4 end
end
-- Every open request may end unknown: the unknown purchases in a row stay within the cap whatever ends how,
-- however many threads buy at once (at most ARGV[6] requests are open while the last ones went well).
local max_unknown = tonumber(ARGV[6] or '0')
if max_unknown > 0 then
  local in_row
  if run then in_row = run[2] else in_row = redis.call('HGET', KEYS[5], 'unknown_in_row') end
  if tonumber(in_row or '0') + redis.call('ZCARD', KEYS[2]) >= max_unknown then return -5 end
end
local price = tonumber(ARGV[2])
local day_cap = tonumber(ARGV[3])
local bought = tonumber(redis.call('HGET', KEYS[3], 'bought_cents') or '0')
if day_cap >= 0 and bought + price > day_cap then return -1 end
if run then
  local cap = run[3]
  local committed = tonumber(run[4] or '0')
  if cap and cap ~= '' and committed + price > tonumber(cap) then
    redis.call('HSET', KEYS[4], 'price_cents', price)
    return -2
  end
  redis.call('HINCRBY', KEYS[4], 'committed_cents', price)
end
redis.call('HINCRBY', KEYS[3], 'bought_cents', price)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'state', 'requested', 'price_cents', price, 'day', ARGV[4], 'run_id', ARGV[5],
           'created_ms', now, 'updated_ms', now)
redis.call('ZADD', KEYS[2], now, ARGV[1])
return 1
