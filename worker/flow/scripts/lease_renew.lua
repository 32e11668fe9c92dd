-- lease_renew.lua: extend a lease the caller still holds, and the image claims given with it (not every beat:
-- a claim holds while its lease does, so its own expiry is only a backstop, see claim.lua).
-- KEYS[1]     the lease key
-- KEYS[2..n]  claim keys the holder took under this lease (a claim's value starts with the holder's token)
-- ARGV[1]     the holder's token
-- ARGV[2]     time to live, ms
-- ARGV[3]     the claims' time to live, ms
-- Returns     1 if the lease was the caller's and is extended, 0 if it was lost (nothing is extended then).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local mine = ARGV[1] .. ' '
for i = 2, #KEYS do
  local claim = redis.call('GET', KEYS[i])
  if claim and string.sub(claim, 1, #mine) == mine then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return 1
