-- resume.lua: a run paused (by its owner, or for budget) continues: the new cap (if given) is set and checked, and the parked
-- chunks are returned (removed only once the caller has sent them again).
-- KEYS[1]  the run's hash
-- KEYS[2]  the run's list of parked chunk messages
-- ARGV[1]  the new budget in cents, '' to keep the current one
-- Returns  {1, parked...} resumed; {0} not paused; {-1, committed, price} the new cap leaves no
--          room for one more call at the last price paid; {-2, committed, price} no new cap, and the current
--          one still leaves no room.
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'paused_budget' and state ~= 'paused' then return {0} end
local committed = tonumber(redis.call('HGET', KEYS[1], 'committed_cents') or '0')
local price = tonumber(redis.call('HGET', KEYS[1], 'price_cents') or '0')
local cap = ARGV[1]
if cap ~= '' and tonumber(cap) < committed + price then return {-1, committed, price} end
if cap == '' and state == 'paused_budget' then
  local current = redis.call('HGET', KEYS[1], 'budget_cents')
  if current and current ~= '' and committed + price > tonumber(current) then return {-2, committed, price} end
elseif cap ~= '' then
  redis.call('HSET', KEYS[1], 'budget_cents', cap)
end
redis.call('HSET', KEYS[1], 'state', redis.call('HGET', KEYS[1], 'listed') == '1' and 'running' or 'listing')
redis.call('HDEL', KEYS[1], 'pause_reason')
-- A person said go on: unknown purchases are counted in a row afresh (buy_failed.lua).
redis.call('HSET', KEYS[1], 'unknown_in_row', 0)
local out = {1}
for _, m in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do table.insert(out, m) end
return out
