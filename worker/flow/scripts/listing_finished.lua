-- listing_finished.lua: the producer has enqueued every chunk: release its hold on the run (one extra
-- `pending` taken at creation, so early chunks cannot finish a run still being listed).
-- KEYS[1]  the run's hash
-- ARGV[1]  the producer's hold (1)
-- Returns  the chunks still pending (0: the run can be finalised now).
if redis.call('HGET', KEYS[1], 'state') == 'listing' then redis.call('HSET', KEYS[1], 'state', 'running') end
redis.call('HSET', KEYS[1], 'listed', '1')
return redis.call('HINCRBY', KEYS[1], 'pending', -tonumber(ARGV[1]))
