-- call_end.lua: a paid answer's verdicts are recorded: the ledger forgets the answer (or keeps it, unreadable,
-- for a person) and the call ends, failed if it bought no verdict (which may stop the run: its threshold).
-- KEYS[1]  the payment's hash
-- KEYS[2]  the run's hash the call was paid for
-- KEYS[3]  the hash of answers not yet recorded (payment id -> "run seq")
-- ARGV[1]  payment id
-- ARGV[2]  '1' if the call bought no verdict (failed), else '0'
-- ARGV[3]  '1' to keep the raw answer (it could not be read), else '0'
-- ARGV[4]  the run id KEYS[2] was built for ('' for none): the recording chunk's, so no round trip reads it
--          first; checked against the payment's own before anything is written
-- Returns  1 if this ended the call and the run failed because of it, else 0; -1 if the payment belongs to
--          another run than ARGV[4] (nothing written: build the keys again).
--#include calls
-- A forgotten payment (no record) has nothing to end: its call ended before it was archived.
local run_id = redis.call('HGET', KEYS[1], 'run_id')
if run_id and run_id ~= ARGV[4] then return -1 end
redis.call('HDEL', KEYS[3], ARGV[1])
if ARGV[3] ~= '1' then redis.call('HDEL', KEYS[1], 'answer') end
return end_call(KEYS[1], KEYS[2], true, ARGV[2] == '1')
