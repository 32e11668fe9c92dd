-- send.lua: written just before a paid call leaves. Fenced: only the delivery the token was lent to, while it
-- still holds its chunk's lease, may send it; a reservation that expired (and went back to the pool) may not.
-- Gated by the run: nothing is sent for a run its owner paused, or one that ended (so `irlive pause`/`cancel`
-- stop payment the moment they return; a run paused for budget still sends the tokens it committed within its
-- cap), nor a call whose failure could carry the run past its failure threshold while other calls are still
-- in flight (so a seller failing every call costs exactly min_calls calls; alone, a call may always go).
-- KEYS[1]  the payment's hash
-- KEYS[2]  the zset of token leases
-- KEYS[3]  the chunk's lease key
-- KEYS[4]  the run's hash (state, calls_ended, calls_failed, calls_in_flight, max_error_rate, min_calls)
-- (the threshold rule, failure_allowance, comes from lib/calls.lua)
-- ARGV[1]  payment id
-- ARGV[2]  holder token (the chunk lease's value)
-- ARGV[3]  the images the call carries (comma-separated identities)
-- ARGV[4]  lease, ms: how long before the sweep may ask the seller what became of the token
-- ARGV[5]  the URLs the call carries without their queries (no signature), one per line, in the images' order:
--          a later delivery reading the answer back matches its elements to these (it may presign elsewhere)
-- Returns  1 marked sent; 0 fenced out (the caller must not send the token); -1 its owner paused the run;
--          -2 the run is cancelled, failed or done; -3 wait for calls in flight to end (the failure threshold).
--#include calls
local payment = redis.call('HMGET', KEYS[1], 'state', 'holder')
if payment[1] ~= 'reserved' or payment[2] ~= ARGV[2] then return 0 end
if redis.call('GET', KEYS[3]) ~= ARGV[2] then return 0 end
local run = threshold(KEYS[4])
if run.state == 'paused' then return -1 end
if run.state ~= 'listing' and run.state ~= 'running' and run.state ~= 'paused_budget' then return -2 end
if run.rate < 1 then
  -- Allowed while, even if every undecided call fails, the run stays at or under its threshold.
  local n = run.ended + run.inflight + 1
  local failed = run.failed + run.inflight + 1
  if run.inflight > 0 and n > run.min_calls and failed > failure_allowance(run.rate, n) then
    return -3
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'state', 'sent', 'images', ARGV[3], 'urls', ARGV[5], 'sent_ms', now,
           'updated_ms', now, 'call_open', '1')
redis.call('HINCRBY', KEYS[4], 'calls_in_flight', 1)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
return 1
