-- add_chunk.lua: a new chunk of a run: its number, its counters and its keys, in one step (a crash cannot
-- count a chunk without keeping its keys).
-- KEYS[1]  the run's hash (chunks, pending, total)
-- KEYS[2]  the run's chunk items hash (seq -> JSON list of [key, etag])
-- ARGV[1]  the chunk's image count
-- ARGV[2]  the chunk's items as JSON
-- Returns  the chunk's sequence number.
local seq = redis.call('HINCRBY', KEYS[1], 'chunks', 1) - 1
redis.call('HINCRBY', KEYS[1], 'pending', 1)
redis.call('HINCRBY', KEYS[1], 'total', tonumber(ARGV[1]))
redis.call('HSET', KEYS[2], seq, ARGV[2])
return seq
