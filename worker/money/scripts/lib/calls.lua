-- lib/calls.lua: the end of a sent (paid) call, included by the scripts that end one (settle, give_back,
-- call_end). A call is open from send.lua until exactly one of them ends it; a paid call that bought no
-- verdict counts as failed, and too many failures stop the run (its failure threshold).
-- payment: the payment's hash; run: the run's hash; paid: the seller kept the token; failed: no verdict.
-- Returns 1 if this ended the call and the run failed because of it, else 0.

-- Failed calls a run may have among n ended ones before it stops: its rate, plus two standard deviations of
-- chance. Simulated over runs of 200 calls at 50 % after 20: a seller failing 30 % of calls would stop one run
-- in 30 by luck alone without the margin, one in 10,000 with it; one failing 60 % is still stopped in 9 runs
-- of 10, one failing every call at exactly n = 20.
local function failure_allowance(rate, n)
  return rate * n + 2 * math.sqrt(n * rate * (1 - rate))
end

-- The calls the threshold looks at: those ended since the run's last redrive (reopen.lua moves the window's
-- start), so a run stopped by its threshold can be judged again once the seller is well.
local function window(run, ended, nfailed)
  return ended - tonumber(redis.call('HGET', run, 'threshold_ended_base') or '0'),
         nfailed - tonumber(redis.call('HGET', run, 'threshold_failed_base') or '0')
end

local function end_call(payment, run, paid, failed)
  if redis.call('HDEL', payment, 'call_open') == 0 then return 0 end
  redis.call('HINCRBY', run, 'calls_in_flight', -1)
  if not paid then return 0 end
  local ended = redis.call('HINCRBY', run, 'calls_ended', 1)
  local nfailed = tonumber(redis.call('HGET', run, 'calls_failed') or '0')
  if failed then nfailed = redis.call('HINCRBY', run, 'calls_failed', 1) end
  ended, nfailed = window(run, ended, nfailed)
  local rate = tonumber(redis.call('HGET', run, 'max_error_rate') or '1')
  local min_calls = tonumber(redis.call('HGET', run, 'min_calls') or '0')
  if rate >= 1 or ended < min_calls or nfailed <= failure_allowance(rate, ended) then return 0 end
  local state = redis.call('HGET', run, 'state')
  if state ~= 'listing' and state ~= 'running' and state ~= 'paused' and state ~= 'paused_budget' then return 0 end
  redis.call('HSET', run, 'state', 'failed', 'stop_reason',
             string.format('%d of %d paid calls failed, above the failure threshold of %d %%',
                           nfailed, ended, math.floor(rate * 100 + 0.5)))
  return 1
end
