-- buy_end.lua: a purchase answered with a payment. The day and the run are charged what the payment cost
-- (not the quote), and the token is reserved for the run that bought it, or put into the shared pool.
-- KEYS[1]  the purchase request's hash          KEYS[5]  wallet totals hash
-- KEYS[2]  the zset of open purchase requests   KEYS[6]  the request's UTC day hash
-- KEYS[3]  the payment's hash                   KEYS[7]  the run's hash (unused when ARGV[5] is '')
-- KEYS[4]  the zset of token leases             KEYS[8]  its listing's pool (a list of payment ids)
--                                                KEYS[9]  tokens held for a person: bought above the price cap
-- ARGV[1]  request id        ARGV[5]  run id, '' for a pool purchase     ARGV[9]   service id
-- ARGV[2]  payment id        ARGV[6]  holder token (a run's purchase)    ARGV[10]  status (paid | pending)
-- ARGV[3]  token             ARGV[7]  lease, ms                          ARGV[11]  max price, cents
-- ARGV[4]  amount, cents     ARGV[8]  token expiry, ms (0 unknown)      ARGV[12]  its listing's pool name
--                                                                        ('' the default listing)
--                                                                        ARGV[13]  the answer's token field
--                                                                        name ('' none)
-- Returns  1 reserved for the run (or pooled, for a pool purchase); -2 pooled because the run's cap would be
--          crossed at the real price; -3 held (not pooled: no run spends it until a person releases it)
--          because the price is above the allowed maximum; 0 the request was already settled (a repeated
--          answer changes nothing).
local request = redis.call('HMGET', KEYS[1], 'state', 'price_cents', 'day')
if request[1] ~= 'requested' then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local price = tonumber(request[2] or '0')
local day = request[3] or ''
local amount = tonumber(ARGV[4])
local run = ARGV[5]
-- The request is settled: the payment's own hash (with its day) is the record from now on.
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
-- The day is charged what was paid: the quote was committed, the difference follows it.
if amount ~= price then redis.call('HINCRBY', KEYS[6], 'bought_cents', amount - price) end
redis.call('HINCRBY', KEYS[5], 'bought', 1)
redis.call('HSET', KEYS[5], 'unknown_in_row', 0)
redis.call('HINCRBY', KEYS[5], 'bought_cents', amount)
-- Where the token goes, decided before its record is written (once, in its final state).
local result = 1
if run ~= '' then
  redis.call('HINCRBY', KEYS[7], 'tokens_bought', 1)
  redis.call('HSET', KEYS[7], 'unknown_in_row', 0, 'price_cents', amount)
  -- The quote was committed; what was paid replaces it.
  if amount ~= price then redis.call('HINCRBY', KEYS[7], 'committed_cents', amount - price) end
  local c = redis.call('HMGET', KEYS[7], 'committed_cents', 'budget_cents')
  local committed, cap = tonumber(c[1] or '0'), c[2]
  if amount > tonumber(ARGV[11]) then
    result = -3
  elseif cap and cap ~= '' and committed > tonumber(cap) then
    result = -2
  end
  if result ~= 1 then redis.call('HINCRBY', KEYS[7], 'committed_cents', -amount) end
end
local held = amount > tonumber(ARGV[11])
local record = {'token', ARGV[3], 'amount_cents', amount, 'expires_ms', ARGV[8], 'service', ARGV[9], 'day', day,
                'pay_status', ARGV[10], 'purchase_id', ARGV[1], 'created_ms', now, 'updated_ms', now,
                'listing', ARGV[12] or ''}
local function add(...)
  for _, v in ipairs({...}) do table.insert(record, v) end
end
if (ARGV[13] or '') ~= '' then add('token_field', ARGV[13]) end
if result == 1 and run ~= '' then
  add('state', 'reserved', 'run_id', run, 'holder', ARGV[6], 'committed', '1')
elseif held then
  add('state', 'held', 'run_id', '', 'committed', '0',
      'hold_reason', 'bought above the price cap of ' .. ARGV[11] .. ' cents')
else
  add('state', 'paid', 'run_id', '', 'committed', '0')
end
redis.call('HSET', KEYS[3], unpack(record))
if result == 1 and run ~= '' then
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[7]), ARGV[2])
  return 1
end
if held then
  redis.call('RPUSH', KEYS[9], ARGV[2])
  return -3
end
redis.call('RPUSH', KEYS[8], ARGV[2])
return result
