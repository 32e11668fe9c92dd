-- record.lua: save image records of one chunk, each at most once, with their judgments entering the done-set
-- (under the identity, and under the content key for byte-identical copies to find) and the claims the caller
-- held on them released, in one step.
-- KEYS[1]              the chunk's progress hash (index -> record JSON)
-- KEYS[2]              the run hash (verdict counters, `done`, `duplicates`, `same_content`, `progress_ms`)
-- KEYS[4i-1..4i+2]     for record i (1-based): its done-set shard hash, its claim key, the content's done-set
--                      shard hash, the content's claim key (the identity's own again without a content key; the
--                      claim key is the content's where the content key follows from the identity: one claim)
-- ARGV[1]              now, ms
-- ARGV[2]              the holder's token ('' = none)
-- ARGV[3]              "<run_id> <seq>" of the chunk: a claim is released if the holder took it, or if any
--                      delivery of this chunk did (a claim pinned to a paid answer outlives its delivery)
-- ARGV[4..]            nine per record: index, record JSON, verdict, done-set field ('' = none), done-set entry,
--                      '1' a duplicate of another run's judgment / '2' a copy of judged content / else '0',
--                      the content's field ('' = none), the identity's field (names the content claim it holds),
--                      the content's entry (the done-set entry without its time)
-- Returns              how many records were new (a repeated save changes nothing).
local mine = ARGV[2] .. ' '
local chunk = ARGV[3]
-- A claim's value is "<holder> <run_id> <seq>[ <identity field>]"; the holder is a token or paid:<payment>.
local function ours(claim)
  if not claim then return false end
  if ARGV[2] ~= '' and string.sub(claim, 1, #mine) == mine then return true end
  local rest = string.match(claim, '^%S+ (.*)$')
  return rest ~= nil and (rest == chunk or string.sub(rest, 1, #chunk + 1) == chunk .. ' ')
end
--#include batch
local saved = 0
-- The run's counters, added up here and written once each: one HINCRBY per counter, not per record.
local counts = {}
local function count(name) counts[name] = (counts[name] or 0) + 1 end
local n = (#KEYS - 2) / 4
-- Read together (one HMGET of the progress hash, one MGET of the claims) and written together (one HSET, one
-- DEL): four commands for a call's records instead of one to three per record. `claims` is this script's view
-- of the claim keys, kept as it releases them.
local indexes = {}
for i = 1, n do table.insert(indexes, ARGV[3 + 9 * (i - 1) + 1]) end
local held = sliced('HMGET', KEYS[1], indexes)
local claims = read_claims(n, 0, 2)
local new_records, written, released = {}, {}, {}
local function release(key)
  claims[key] = false
  table.insert(released, key)
end
for i = 1, n do
  local shard, claim_key, cshard, cclaim = KEYS[4 * i - 1], KEYS[4 * i], KEYS[4 * i + 1], KEYS[4 * i + 2]
  local a = 3 + 9 * (i - 1)
  local index, record, verdict, field, entry = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local kind, cfield, owner, centry = ARGV[a + 6], ARGV[a + 7], ARGV[a + 8], ARGV[a + 9]
  if not held[i] and not written[index] then
    written[index] = true
    table.insert(new_records, index)
    table.insert(new_records, record)
    count(verdict)
    count('done')
    if kind == '1' then count('duplicates') end
    if kind == '2' then count('same_content') end
    if field ~= '' then
      redis.call('HSET', shard, field, entry)
      -- The first judgment of a content stays its reference.
      if cfield ~= '' then redis.call('HSETNX', cshard, cfield, centry) end
    end
    saved = saved + 1
  end
  -- One claim for both (the content's, see claim.lua) is released below, with its owner checked.
  local own = cfield == '' or claim_key ~= cclaim
  if own and ours(claims[claim_key]) then release(claim_key) end
  if cfield ~= '' then
    local cclaimed = claims[cclaim]
    if ours(cclaimed) and string.sub(cclaimed, -(#owner + 1)) == ' ' .. owner then release(cclaim) end
  end
end
sliced('HSET', KEYS[1], new_records)
sliced('DEL', false, released)
for name, by in pairs(counts) do redis.call('HINCRBY', KEYS[2], name, by) end
redis.call('HSET', KEYS[2], 'progress_ms', ARGV[1])
return saved
