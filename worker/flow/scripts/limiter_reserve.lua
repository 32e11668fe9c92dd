-- limiter_reserve.lua: GCRA at the effective rate, on the Redis server's clock, shared by every worker. A caller
-- is given its place in line now (the time it may call at), so it sleeps once instead of asking again and again.
-- Calls other than event calls step aside while event chunks wait in their queue, and may not queue further
-- ahead than their horizon: an event call is never behind more than that much other work.
-- KEYS[1]  the theoretical arrival time (TAT) key, microseconds
-- KEYS[2]  the limiter's state hash (rate, cooldown_until)
-- KEYS[3]  the events queue (a list: event chunks not yet fetched by any worker)
-- KEYS[4]  the waiting room's TAT, microseconds: callers with no place within their horizon are given return
--          times one emission apart, so that each comes back when a place is likely free (not all at once)
-- ARGV[1]  the ceiling rate, calls per second (the effective rate never exceeds it)
-- ARGV[2]  burst: calls that may go back to back
-- ARGV[3]  '1' for an event call (urgent), '0' for any other
-- ARGV[4]  horizon, us: how far ahead a place may be taken
-- ARGV[5]  how long the caller may still wait, us: a return time beyond it is told but not taken (the caller
--          defers its chunk, and must not push the callers after it further out)
-- Returns  {1, wait_us} a place taken: call after wait_us; {0, wait_us} none within the horizon: ask again after
--          wait_us (no place taken; a return time taken in the waiting room); {2, 0} yield to event work.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[3] ~= '1' and redis.call('LLEN', KEYS[3]) > 0 then return {2, 0} end
local state = redis.call('HMGET', KEYS[2], 'rate', 'cooldown_until')
local ceiling = tonumber(ARGV[1])
local rate = tonumber(state[1] or ARGV[1])
if rate > ceiling then rate = ceiling end
local emission = 1000000 / rate
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
-- The seller said 'too fast': nobody's place comes before the end of its Retry-After.
local cooldown = tonumber(state[2] or '0')
if tat < cooldown then tat = cooldown end
local new_tat = tat + emission
local go_at = new_tat - tonumber(ARGV[2]) * emission
if go_at < now then go_at = now end
local horizon = tonumber(ARGV[4])
if go_at - now > horizon then
  local back = go_at - horizon
  local room = tonumber(redis.call('GET', KEYS[4]) or '0')
  if room > back then back = room end
  if back - now > tonumber(ARGV[5]) then return {0, math.ceil(back - now)} end
  local after = back + emission
  redis.call('SET', KEYS[4], string.format('%.0f', after), 'PX', math.ceil((after - now) / 1000) + 1000)
  return {0, math.ceil(back - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, math.ceil(go_at - now)}
