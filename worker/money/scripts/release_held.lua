-- release_held.lua: a person's say: tokens held because they cost more than a price cap go back to the pool
-- (a worker whose cap is still lower holds them again when it meets them; see take.lua).
-- KEYS[1]     the held list
-- KEYS[2]     the shared pool
-- KEYS[3..n]  the payment hashes of the tokens to release (read from the held list by the caller)
-- ARGV[1..]   their payment ids, in the same order
-- Returns     how many tokens went back to the pool.
local n = 0
for i = 3, #KEYS do
  local pid = ARGV[i - 2]
  if redis.call('LREM', KEYS[1], 0, pid) > 0 and redis.call('HGET', KEYS[i], 'state') == 'held' then
    redis.call('HSET', KEYS[i], 'state', 'paid')
    redis.call('HDEL', KEYS[i], 'hold_reason')
    redis.call('RPUSH', KEYS[2], pid)
    n = n + 1
  end
end
return n
