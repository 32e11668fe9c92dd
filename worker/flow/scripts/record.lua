-- record.lua: save image records of one chunk, each at most once, with their judgments entering the done-set
-- and the claims the caller held on them released, in one step.
-- KEYS[1]              the chunk's progress hash (index -> record JSON)
-- KEYS[2]              the run hash (verdict counters, `done`, `duplicates`, `progress_ms`)
-- KEYS[2+2i-1], KEYS[2+2i]  for record i (1-based): its done-set shard hash, its claim key
-- ARGV[1]              now, ms
-- ARGV[2]              the holder's token ('' = none: claims are left alone)
-- ARGV[3..]            six per record: index, record JSON, verdict, done-set field ('' = none), done-set entry,
--                      '1' if the record is a duplicate of another run's judgment, else '0'
-- Returns              how many records were new (a repeated save changes nothing).
local mine = ARGV[2] .. ' '
local saved = 0
local n = (#KEYS - 2) / 2
for i = 1, n do
  local shard, claim_key = KEYS[2 + 2 * i - 1], KEYS[2 + 2 * i]
  local a = 2 + 6 * (i - 1)
  local index, record, verdict, field, entry = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  if redis.call('HSETNX', KEYS[1], index, record) == 1 then
    redis.call('HINCRBY', KEYS[2], verdict, 1)
    redis.call('HINCRBY', KEYS[2], 'done', 1)
    if ARGV[a + 6] == '1' then redis.call('HINCRBY', KEYS[2], 'duplicates', 1) end
    if field ~= '' then redis.call('HSET', shard, field, entry) end
    saved = saved + 1
  end
  if ARGV[2] ~= '' then
    local claim = redis.call('GET', claim_key)
    if claim and string.sub(claim, 1, #mine) == mine then redis.call('DEL', claim_key) end
  end
end
redis.call('HSET', KEYS[2], 'progress_ms', ARGV[1])
return saved
