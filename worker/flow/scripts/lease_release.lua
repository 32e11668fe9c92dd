-- lease_release.lua: give a lease back, with the image claims still held under it, if the caller holds it.
-- KEYS[1]     the lease key
-- KEYS[2..n]  claim keys the holder may still hold (released only if their value starts with its token)
-- ARGV[1]     the holder's token
-- Returns     1 if the lease was the caller's and is released, else 0 (claims are released either way if theirs).
local mine = ARGV[1] .. ' '
for i = 2, #KEYS do
  local claim = redis.call('GET', KEYS[i])
  if claim and string.sub(claim, 1, #mine) == mine then redis.call('DEL', KEYS[i]) end
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
