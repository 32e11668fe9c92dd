-- complete_chunk.lua: a chunk's manifest is written; count it once, however many deliveries complete it.
-- KEYS[1]  the run's set of completed chunk numbers
-- KEYS[2]  the run's hash (pending)
-- KEYS[3]  the run's hash of chunk summaries (chunk number -> the manifest's ETag and counts, JSON)
-- ARGV[1]  the chunk's sequence number
-- ARGV[2]  the chunk's summary (the manifest last written for it)
-- Returns  the run's chunks still pending after this one (0: the run can be finalised).
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  return redis.call('HINCRBY', KEYS[2], 'pending', -1)
end
return tonumber(redis.call('HGET', KEYS[2], 'pending') or '0')
