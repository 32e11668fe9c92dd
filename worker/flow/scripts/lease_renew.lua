-- lease_renew.lua: extend a lease the caller still holds, the limiter's in-flight slots of calls made under it
-- (so a killed worker's slots lapse with its lease, not a call timeout later), and the image claims given with
-- it (not every beat: a claim holds while its lease does, so its own expiry is only a backstop, see claim.lua).
-- KEYS[1]     the lease key
-- KEYS[2]     the limiter's in-flight slots (zset, member -> expiry ms on this clock) when ARGV[4] > 0
-- KEYS[...]   then claim keys the holder took under this lease (a claim's value starts with the holder's token)
-- ARGV[1]     the holder's token
-- ARGV[2]     time to live, ms (the slots' too)
-- ARGV[3]     the claims' time to live, ms
-- ARGV[4]     how many slot members follow (ARGV[5..]); a slot given back meanwhile is not taken again (XX)
-- Returns     1 if the lease was the caller's and is extended, 0 if it was lost (nothing is extended then).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local slots = tonumber(ARGV[4] or '0')
local first_claim = 2
if slots > 0 then
  local t = redis.call('TIME')
  local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
  for i = 5, 4 + slots do redis.call('ZADD', KEYS[2], 'XX', expiry, ARGV[i]) end
  first_claim = 3
end
local mine = ARGV[1] .. ' '
for i = first_claim, #KEYS do
  local claim = redis.call('GET', KEYS[i])
  if claim and string.sub(claim, 1, #mine) == mine then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return 1
