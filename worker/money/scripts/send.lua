-- send.lua: written just before a paid call leaves. Fenced: only the delivery the token was lent to, while it
-- still holds its chunk's lease, may send it; a reservation that expired (and went back to the pool) may not.
-- KEYS[1]  the payment's hash
-- KEYS[2]  the zset of token leases
-- KEYS[3]  the chunk's lease key
-- ARGV[1]  payment id
-- ARGV[2]  holder token (the chunk lease's value)
-- ARGV[3]  the images the call carries (comma-separated identities)
-- ARGV[4]  lease, ms: how long before the sweep may ask the seller what became of the token
-- Returns  1 marked sent; 0 fenced out (the caller must not send the token).
if redis.call('HGET', KEYS[1], 'state') ~= 'reserved' then return 0 end
if redis.call('HGET', KEYS[1], 'holder') ~= ARGV[2] then return 0 end
if redis.call('GET', KEYS[3]) ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'state', 'sent', 'images', ARGV[3], 'sent_ms', now, 'updated_ms', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
return 1
