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

-- What the threshold reads of a run, in one HMGET: its state, rule and counts, and the calls it looks at:
-- those ended since the run's last redrive (reopen.lua moves the window's start), so a run stopped by its
-- threshold can be judged again once the seller is well.
local function threshold(run)
  local f = redis.call('HMGET', run, 'state', 'max_error_rate', 'min_calls', 'calls_in_flight', 'calls_ended',
                       'calls_failed', 'threshold_ended_base', 'threshold_failed_base')
  return {state = f[1], rate = tonumber(f[2] or '1'), min_calls = tonumber(f[3] or '0'),
          inflight = tonumber(f[4] or '0'), ended = tonumber(f[5] or '0') - tonumber(f[7] or '0'),
          failed = tonumber(f[6] or '0') - tonumber(f[8] or '0')}
end

local function end_call(payment, run, paid, failed)
  if redis.call('HDEL', payment, 'call_open') == 0 then return 0 end
  redis.call('HINCRBY', run, 'calls_in_flight', -1)
  if not paid then return 0 end
  redis.call('HINCRBY', run, 'calls_ended', 1)
  if failed then redis.call('HINCRBY', run, 'calls_failed', 1) end
  local t = threshold(run)
  if t.rate >= 1 or t.ended < t.min_calls or t.failed <= failure_allowance(t.rate, t.ended) then return 0 end
  if t.state ~= 'listing' and t.state ~= 'running' and t.state ~= 'paused' and t.state ~= 'paused_budget' then
    return 0
  end
  redis.call('HSET', run, 'state', 'failed', 'stop_reason',
             string.format('%d of %d paid calls failed, above the failure threshold of %d %%',
                           t.failed, t.ended, math.floor(t.rate * 100 + 0.5)))
  return 1
end
