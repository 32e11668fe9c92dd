-- release.lua: a lent payment that is not stock (an x402 authorization, signed per call) ends `unsettled` instead of
-- going back to the pool: it was never sent, or the seller did not settle it. Nothing was paid, so the run's
-- commitment and the day's charge made when it was committed (buy_begin/buy_end) go back, and its call ends unpaid.
-- KEYS[1]  the payment's hash
-- KEYS[2]  the zset of token leases
-- KEYS[3]  the run's hash the payment was lent to
-- KEYS[4]  the UTC day's hash it was charged to (its `day` field)
-- KEYS[5]  wallet totals hash
-- ARGV[1]  payment id
-- ARGV[2]  the run id the caller read from the payment (checked, so the right run is credited)
-- ARGV[3]  the state the caller expects: 'reserved' or 'sent' (anything else is left alone)
-- ARGV[4]  the holder token the caller expects, '' for any (a sweep)
-- ARGV[5]  '1' to act only if the payment's lease has expired on the Redis clock (a sweep), else '0'
-- Returns  1 released; 0 not in the expected state, holder or expiry; -1 lent to another run.
--#include calls
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[3] then return 0 end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'holder') ~= ARGV[4] then return 0 end
if (redis.call('HGET', KEYS[1], 'run_id') or '') ~= ARGV[2] then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[5] == '1' then
  local expiry = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0')
  if expiry > now then return 0 end
end
local amount = tonumber(redis.call('HGET', KEYS[1], 'amount_cents') or '0')
if redis.call('HGET', KEYS[1], 'committed') == '1' and ARGV[2] ~= '' then
  redis.call('HINCRBY', KEYS[3], 'committed_cents', -amount)
end
end_call(KEYS[1], KEYS[3], false, false)
redis.call('HINCRBY', KEYS[4], 'bought_cents', -amount)
redis.call('HINCRBY', KEYS[5], 'bought', -1)
redis.call('HINCRBY', KEYS[5], 'bought_cents', -amount)
redis.call('HINCRBY', KEYS[5], 'unsettled', 1)
if ARGV[2] ~= '' then redis.call('HINCRBY', KEYS[3], 'tokens_bought', -1) end
redis.call('HSET', KEYS[1], 'state', 'unsettled', 'committed', '0', 'holder', '', 'updated_ms', now)
redis.call('ZREM', KEYS[2], ARGV[1])
-- Kept a week for a person asking what happened to it, then gone (nothing was paid: nothing to archive).
redis.call('PEXPIRE', KEYS[1], 7 * 24 * 3600 * 1000)
return 1
