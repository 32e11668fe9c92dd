-- give_back.lua: a lent token goes back to the shared pool (it was never sent, or the seller says it is
-- unused), and the run it was charged to gets its commitment back.
-- KEYS[1]  the payment's hash
-- KEYS[2]  the zset of token leases
-- KEYS[3]  the shared pool
-- KEYS[4]  the run's hash the token was lent to
-- ARGV[1]  payment id
-- ARGV[2]  the run id the caller read from the payment (checked, so the right run is credited)
-- ARGV[3]  the state the caller expects: 'reserved' or 'sent' (anything else is left alone)
-- ARGV[4]  the holder token the caller expects, '' for any (a sweep)
-- ARGV[5]  '1' to act only if the token's lease has expired on the Redis clock (a sweep), else '0'
-- Returns  1 back in the pool; 0 not in the expected state, holder or expiry; -1 lent to another run.
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
if redis.call('HGET', KEYS[1], 'committed') == '1' and ARGV[2] ~= '' then
  redis.call('HINCRBY', KEYS[4], 'committed_cents', -tonumber(redis.call('HGET', KEYS[1], 'amount_cents') or '0'))
end
-- A sent token the seller did not consume: its call ends, unpaid.
end_call(KEYS[1], KEYS[4], false, false)
redis.call('HSET', KEYS[1], 'state', 'paid', 'committed', '0', 'holder', '', 'run_id', '', 'images', '',
           'updated_ms', now)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[1])
return 1
