-- x402_note.lua: writes what an x402 payment's signature and answer tell (validBefore, nonce, payer, amount, the
-- outcome, the transaction) onto its ledger record, only while that record exists: a payment already settled,
-- archived and forgotten (forget_settled) is not brought back half-empty by a late writer.
-- KEYS[1]  the payment's hash
-- ARGV     field, value, field, value, ... (never a signature or a key)
-- Returns  1 written; 0 no such record.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
