-- settle.lua: a lent token ends: spent (the seller consumed it) or void (the seller refused it). Only the first
-- settlement counts, so a reconciliation racing an answer can never charge twice; an answer arriving after a
-- reconciliation that counted it lost is still kept, and the loss uncounted.
-- KEYS[1]  the payment's hash            KEYS[4]  the run's hash (calls, spend_cents, answers_lost, ...)
-- KEYS[2]  the zset of token leases      KEYS[5]  the hash of answers not yet recorded (payment id -> "run seq")
-- KEYS[3]  wallet totals hash          KEYS[6]  the run's set of settled payments (archived when it finishes)
-- ARGV[1]  payment id
-- ARGV[2]  'spent' or 'void'
-- ARGV[3]  the seller's request id, '' if there was no answer
-- ARGV[4]  the raw answer (size-capped), '' if none: kept until its verdicts are recorded
-- ARGV[5]  '1' if the seller consumed the token and its answer never reached us (an answer lost), else '0'
-- ARGV[6]  "<run_id> <seq>" of the chunk that must record the answer, '' if none
-- ARGV[7]  why (for void), '' if nothing to say
-- ARGV[8]  with an answer: '0' it bought a verdict, '1' it bought none (the call ends now, counted by the
--          failure threshold); '' the call stays open until its verdicts are recorded (call_end.lua)
-- ARGV[9]  how long (ms) the claims of an answer kept here stay pinned
-- ARGV[10] the run id KEYS[4] and KEYS[6] were built for ('' for none): the caller's token names it, so no round
--          trip reads it first; checked against the payment's own before anything is written
-- KEYS[7..] the image claims the call's chunk took on its images: with an answer kept, each one still held by
--          that chunk (ARGV[6]) is pinned to the payment: no longer renewed or released with the chunk lease, it
--          outlives a killed worker until its chunk's next delivery records the answer (record.lua releases
--          it), so no other run's delivery pays for those images again meanwhile.
-- Returns  {status, amount in cents}: status 1 if this call settled the token, 2 if it did and ending the
--          call failed the run (its threshold), 0 if it was settled before (or its record is gone: archived),
--          -1 if the payment belongs to another run than ARGV[10] (nothing written: build the keys again).
--#include calls
local function pin_claims()
  if ARGV[6] == '' or #KEYS < 7 then return end
  local claims = redis.call('MGET', unpack(KEYS, 7))
  for i = 7, #KEYS do
    local claim = claims[i - 6]
    local rest = claim and string.match(claim, '^%S+ (.*)$')
    if rest and (rest == ARGV[6] or string.sub(rest, 1, #ARGV[6] + 1) == ARGV[6] .. ' ') then
      redis.call('SET', KEYS[i], 'paid:' .. ARGV[1] .. ' ' .. rest, 'PX', ARGV[9])
    end
  end
end
-- What this script reads of the payment, in one HMGET (none of it is written below before it is read).
local p = redis.call('HMGET', KEYS[1], 'state', 'images', 'request_id', 'lost', 'amount_cents', 'run_id')
-- A payment with no record (every record has a state) was settled, archived and forgotten (forget_settled): a
-- late settlement (an answer, a reconciliation racing the run's end) must not bring it back half-empty and
-- count it a second time.
if not p[1] then return {0, 0} end
local state, images, run_id = p[1], p[2] or '', p[6] or ''
if run_id ~= ARGV[10] then return {-1, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n_images = 0
if images ~= '' then n_images = select(2, string.gsub(images, ',', ',')) + 1 end
if state == 'spent' or state == 'void' then
  if ARGV[4] ~= '' and state == 'spent' and not p[3] then
    redis.call('HSET', KEYS[1], 'request_id', ARGV[3], 'answer', ARGV[4], 'updated_ms', now)
    if ARGV[6] ~= '' then redis.call('HSET', KEYS[5], ARGV[1], ARGV[6]) end
    pin_claims()
    if p[4] == '1' then
      redis.call('HSET', KEYS[1], 'lost', '0')
      redis.call('HINCRBY', KEYS[4], 'answers_lost', -1)
      redis.call('HINCRBY', KEYS[4], 'answers_lost_images', -n_images)
      redis.call('HINCRBY', KEYS[3], 'answers_lost', -1)
    end
  end
  return {0, 0}
end
local amount = tonumber(p[5] or '0')
-- The payment's record is written once: its end, and what the seller said.
local record = {'state', ARGV[2], 'committed', '0', 'updated_ms', now, 'lost', ARGV[5]}
if ARGV[7] ~= '' then table.insert(record, 'void_reason'); table.insert(record, ARGV[7]) end
if ARGV[2] == 'spent' and ARGV[3] ~= '' then table.insert(record, 'request_id'); table.insert(record, ARGV[3]) end
if ARGV[2] == 'spent' and ARGV[4] ~= '' then table.insert(record, 'answer'); table.insert(record, ARGV[4]) end
redis.call('HSET', KEYS[1], unpack(record))
redis.call('ZREM', KEYS[2], ARGV[1])
if run_id ~= '' then redis.call('SADD', KEYS[6], ARGV[1]) end
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
redis.call('HINCRBY', KEYS[3], ARGV[2] .. '_cents', amount)
-- A refused token ends its call unpaid; one consumed without an answer ends it failed; an answer kept here
-- ends it now if the caller read whether it bought a verdict, else when its verdicts are recorded
-- (call_end.lua).
local stopped = 0
if ARGV[2] == 'void' then end_call(KEYS[1], KEYS[4], false, false)
elseif ARGV[4] == '' then stopped = end_call(KEYS[1], KEYS[4], true, true)
elseif ARGV[8] ~= '' then stopped = end_call(KEYS[1], KEYS[4], true, ARGV[8] == '1') end
if ARGV[2] == 'spent' then
  if run_id ~= '' then
    redis.call('HINCRBY', KEYS[4], 'calls', 1)
    redis.call('HINCRBY', KEYS[4], 'spend_cents', amount)
  end
  if ARGV[4] ~= '' then
    if ARGV[6] ~= '' then redis.call('HSET', KEYS[5], ARGV[1], ARGV[6]) end
    pin_claims()
  end
  if ARGV[5] == '1' then
    redis.call('HINCRBY', KEYS[4], 'answers_lost', 1)
    redis.call('HINCRBY', KEYS[4], 'answers_lost_images', n_images)
    redis.call('HINCRBY', KEYS[3], 'answers_lost', 1)
  end
end
return {1 + stopped, amount}
