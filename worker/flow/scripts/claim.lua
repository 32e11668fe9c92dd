-- claim.lua: before an image is packed into a paid call, claim its identity for the chunk delivery that holds
-- the chunk's lease; an identity already judged, or claimed by another live delivery, is reported instead.
-- With a content key (byte-identical objects share it), a copy of content already judged is reported as such,
-- and only one identity at a time may hold the content's claim: the other copies wait for its verdict.
-- KEYS[1]           the chunk's lease (the claim is refused unless its value is ARGV[1])
-- KEYS[4i-2..4i+1]  for identity i (1-based): its done-set shard hash, its claim key, the content's done-set
--                   shard hash, the content's claim key (the identity's own again when it has no content key;
--                   the claim key is the content's where the content key follows from the identity: one claim)
-- ARGV[1]           the holder's token (the chunk lease value)
-- ARGV[2]           claim time to live, ms (long: a claim holds while its delivery's lease does, see below)
-- ARGV[3]           what the claim says after the token: "<run_id> <seq>"
-- ARGV[4]           judgments recorded before this time (ms) are ignored (a --force run, which also ignores
--                   content entries: they carry no time); 0 = all count
-- ARGV[5]           the chunk lease keys' prefix: a claim "<token> <run_id> <seq>" holds while the key
--                   ARGV[5] .. "<run_id>:<seq>" holds <token> (a killed worker's claims come free with its lease,
--                   and a heartbeat renews the lease alone, not every claim under it)
-- ARGV[4+2i]        identity i's field in its done-set shard
-- ARGV[5+2i]        the content's field in its shard, '' when the identity has no content key
-- Returns           {-1} if the caller does not hold the lease; else two entries per identity:
--                   1, ''        claimed for the caller (newly, or it already held it)
--                   2, entry     already judged: the done-set entry
--                   3, claim     held by another live delivery (or, for content, by another copy): its claim
-- A claim an earlier delivery of the same chunk took (its lease is gone, as the caller holds it now), or pinned
-- to an answer it paid for (settle.lua), is the caller's: the chunk's records are its own to write.
--                   4, entry     another object with the same content was judged: that done-set entry
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1} end
local mine = ARGV[1] .. ' '
local value = mine .. ARGV[3]
local not_before = tonumber(ARGV[4])
local function fresh(entry)
  if not entry then return nil end
  local judged_ms = tonumber(string.match(entry, '^[^|]*|(%d+)|') or '')
  if not_before == 0 or (judged_ms and judged_ms >= not_before) then return entry end
  return nil
end
-- Another delivery's claim holds while its lease does, or while it is pinned to a paid answer (settle.lua).
local function held(claim)
  local holder, run, seq = string.match(claim, '^(%S+) (%S+) (%S+)')
  if not holder or string.sub(holder, 1, 5) == 'paid:' then return true end
  return redis.call('GET', ARGV[5] .. run .. ':' .. seq) == holder
end
local function this_chunk(claim)
  local rest = string.match(claim, '^%S+ (.*)$')
  return rest ~= nil and (rest == ARGV[3] or string.sub(rest, 1, #ARGV[3] + 1) == ARGV[3] .. ' ')
end
--#include batch
-- The claims are read with one MGET (not a GET per image), and this view of them kept as they are written.
local n = (#KEYS - 1) / 4
local claims = read_claims(n, -1, 1)
local function claim_for(key, claim)
  redis.call('SET', key, claim, 'PX', ARGV[2])
  claims[key] = claim
end
local out = {}
for i = 1, n do
  local shard, claim_key, cshard, cclaim = KEYS[4 * i - 2], KEYS[4 * i - 1], KEYS[4 * i], KEYS[4 * i + 1]
  local field, cfield = ARGV[4 + 2 * i], ARGV[5 + 2 * i]
  local entry = fresh(redis.call('HGET', shard, field))
  local centry = nil
  if not entry and cfield ~= '' and not_before == 0 then centry = redis.call('HGET', cshard, cfield) end
  if entry then
    table.insert(out, 2)
    table.insert(out, entry)
  elseif centry then
    table.insert(out, 4)
    table.insert(out, centry)
  else
    -- The content's claim names the identity that holds it, so two copies in one delivery are told apart.
    local cvalue = value .. ' ' .. field
    local cclaimed = cfield ~= '' and claims[cclaim]
    -- One claim for both (the content's): read as the identity's too, whose checks hold on its value.
    local one = cfield ~= '' and claim_key == cclaim
    local claim = cclaimed
    if not one then claim = claims[claim_key] end
    if claim and string.sub(claim, 1, #mine) ~= mine and not this_chunk(claim) and held(claim) then
      table.insert(out, 3)
      table.insert(out, claim)
    elseif cclaimed and string.sub(cclaimed, -(#field + 1)) ~= ' ' .. field and held(cclaimed) then
      table.insert(out, 3)
      table.insert(out, cclaimed)
    else
      if not one then claim_for(claim_key, value) end
      if cfield ~= '' then claim_for(cclaim, cvalue) end
      table.insert(out, 1)
      table.insert(out, '')
    end
  end
end
return out
