-- take.lua: lend one prepaid token from the shared pool to a chunk delivery, charging its price to the run's
-- budget, in one step. The caller names the payment id it wants (read from the pool), so no key is built here.
-- KEYS[1]  the shared pool (a list of payment ids)
-- KEYS[2]  the payment's hash
-- KEYS[3]  the zset of token leases (payment id -> expiry, ms on the Redis clock)
-- KEYS[4]  the run's hash (committed_cents, budget_cents)
-- KEYS[5]  wallet totals hash
-- KEYS[6]  tokens held for a person (a token above the price cap is moved there, never lent)
-- ARGV[1]  payment id
-- ARGV[2]  run id
-- ARGV[3]  holder token (the chunk delivery's lease token): only it may send the token
-- ARGV[4]  lease, ms
-- ARGV[5]  a token this close to its expiry (ms) is not lent: the call might outlive it
-- ARGV[6]  the taker's price cap, cents (IRLIVE_MAX_PRICE_CENTS): a dearer token is held, not lent
-- Returns  {1, token, amount} lent; {0} someone else took that id first (read the pool again);
--          {-1} the run's cap would be crossed (the token stays in the pool); {-3} it had expired (voided);
--          {-4} its owner paused the run; {-5} the run is cancelled, failed or done (nothing is lent to it);
--          {-6} it cost more than the taker's cap (held for a person; read the pool again).
--          A run paused for budget is held by its cap, checked below.
local run = redis.call('HMGET', KEYS[4], 'state', 'budget_cents', 'committed_cents')
if run[1] == 'paused' then return {-4} end
if run[1] ~= 'listing' and run[1] ~= 'running' and run[1] ~= 'paused_budget' then return {-5} end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return {0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local payment = redis.call('HMGET', KEYS[2], 'state', 'expires_ms', 'amount_cents', 'token')
if payment[1] ~= 'paid' then return {0} end
local expires = tonumber(payment[2] or '0')
local amount = tonumber(payment[3] or '0')
if expires > 0 and expires <= now + tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[2], 'state', 'void', 'void_reason', 'expired in pool', 'updated_ms', now)
  redis.call('HINCRBY', KEYS[5], 'expired_in_pool', 1)
  redis.call('HINCRBY', KEYS[5], 'void', 1)
  redis.call('HINCRBY', KEYS[5], 'void_cents', amount)
  return {-3}
end
if amount > tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[2], 'state', 'held', 'updated_ms', now,
             'hold_reason', 'costs more than the price cap of ' .. ARGV[6] .. ' cents')
  redis.call('RPUSH', KEYS[6], ARGV[1])
  return {-6}
end
local cap = run[2]
local committed = tonumber(run[3] or '0')
if cap and cap ~= '' and committed + amount > tonumber(cap) then
  redis.call('HSET', KEYS[4], 'price_cents', amount)
  redis.call('LPUSH', KEYS[1], ARGV[1])
  return {-1}
end
redis.call('HINCRBY', KEYS[4], 'committed_cents', amount)
redis.call('HSET', KEYS[4], 'price_cents', amount)
redis.call('HSET', KEYS[2], 'state', 'reserved', 'run_id', ARGV[2], 'holder', ARGV[3], 'committed', '1',
           'updated_ms', now)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[1])
return {1, payment[4] or '', amount}
