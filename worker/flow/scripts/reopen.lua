-- reopen.lua: a redrive: drop some records of one chunk so their images are judged again, and reopen the
-- chunk (and the run) if anything was dropped. A failed run's failure threshold starts a new window.
-- KEYS[1]  the chunk's progress hash
-- KEYS[2]  the run's hash
-- KEYS[3]  the run's set of completed chunks
-- KEYS[4]  the run's deliveries hash (its count for this chunk starts again)
-- ARGV[1..n-1]  indices of the records to drop
-- ARGV[n]  the chunk's sequence number
-- Returns  how many records were dropped.
local removed = 0
for i = 1, #ARGV - 1 do
  local rec = redis.call('HGET', KEYS[1], ARGV[i])
  if rec then
    local verdict = cjson.decode(rec)['verdict']
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('HINCRBY', KEYS[2], verdict, -1)
    redis.call('HINCRBY', KEYS[2], 'done', -1)
    removed = removed + 1
  end
end
if removed > 0 and redis.call('SREM', KEYS[3], ARGV[#ARGV]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'pending', 1)
end
if removed > 0 then
  if redis.call('HGET', KEYS[2], 'state') == 'failed' then
    -- Stopped by its failure threshold (or an error): the calls already ended do not count against the redrive.
    redis.call('HSET', KEYS[2], 'threshold_ended_base', redis.call('HGET', KEYS[2], 'calls_ended') or '0',
               'threshold_failed_base', redis.call('HGET', KEYS[2], 'calls_failed') or '0')
  end
  redis.call('HSET', KEYS[2], 'state', 'running')
  redis.call('HDEL', KEYS[2], 'finished_at', 'tokens_unspent', 'archived_at', 'finalised_at', 'stop_reason')
  redis.call('HDEL', KEYS[4], ARGV[#ARGV], 'bug:' .. ARGV[#ARGV], 'error:' .. ARGV[#ARGV])
end
return removed
