"""The one Lua function that settles a token (spent or void); shared by the wallet and the answered-call commit."""

# settle(pay, leases, totals, run, pid, amount, request_id, now_ms, to): only the first transition into
# 'spent' or 'void' counts, so a reconcile racing an answer can never charge twice. Returns 1 if it settled.
SETTLE_FN = """
local function settle(pay, leases, totals, run, pid, amount, request_id, now_ms, to)
  local state = redis.call('HGET', pay, 'state')
  if state == 'spent' or state == 'void' then return 0 end
  redis.call('HSET', pay, 'state', to, 'committed', '0', 'request_id', request_id, 'updated_ms', now_ms)
  redis.call('ZREM', leases, pid)
  redis.call('HINCRBY', totals, to, 1)
  redis.call('HINCRBY', totals, to .. '_cents', amount)
  if run ~= '' and to == 'spent' then
    redis.call('HINCRBY', run, 'calls', 1)
    redis.call('HINCRBY', run, 'spend_cents', amount)
  end
  return 1
end
"""
