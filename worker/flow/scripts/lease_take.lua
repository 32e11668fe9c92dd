-- lease_take.lua: take a lease, or keep it if the caller already holds it; expiry is on the Redis clock.
-- KEYS[1]  the lease key (a string whose value is the holder's token)
-- ARGV[1]  the holder's token
-- ARGV[2]  time to live, ms
-- Returns  1 if the caller holds the lease now, 0 if someone else does.
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
