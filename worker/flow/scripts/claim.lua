-- claim.lua: before an image is packed into a paid call, claim its identity for the chunk delivery that holds
-- the chunk's lease; an identity already judged, or claimed by another live delivery, is reported instead.
-- KEYS[1]           the chunk's lease (the claim is refused unless its value is ARGV[1])
-- KEYS[2i], KEYS[2i+1]  for identity i (1-based): its done-set shard hash, its claim key
-- ARGV[1]           the holder's token (the chunk lease value)
-- ARGV[2]           claim time to live, ms (the lease's: a claim expires with the lease that renews it)
-- ARGV[3]           what the claim says after the token: "<run_id> <seq>"
-- ARGV[4]           judgments recorded before this time (ms) are ignored (a --force run); 0 = all count
-- ARGV[4+i]         identity i's field in its done-set shard
-- Returns           {-1} if the caller does not hold the lease; else two entries per identity:
--                   1, ''        claimed for the caller (newly, or it already held it)
--                   2, entry     already judged: the done-set entry
--                   3, claim     held by another live delivery: its claim value
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1} end
local mine = ARGV[1] .. ' '
local value = mine .. ARGV[3]
local not_before = tonumber(ARGV[4])
local out = {}
for i = 1, (#KEYS - 1) / 2 do
  local shard, claim_key = KEYS[2 * i], KEYS[2 * i + 1]
  local entry = redis.call('HGET', shard, ARGV[4 + i])
  local judged_ms = entry and tonumber(string.match(entry, '^[^|]*|(%d+)|')) or nil
  if entry and (not_before == 0 or (judged_ms and judged_ms >= not_before)) then
    table.insert(out, 2)
    table.insert(out, entry)
  else
    local claim = redis.call('GET', claim_key)
    if claim and string.sub(claim, 1, #mine) ~= mine then
      table.insert(out, 3)
      table.insert(out, claim)
    else
      redis.call('SET', claim_key, value, 'PX', ARGV[2])
      table.insert(out, 1)
      table.insert(out, '')
    end
  end
end
return out
