"""Payment tokens and their ledger: every token's life is written down in Redis before each step."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from worker.errors import ConfigError, OutcomeUnknown, TransientError
from worker.keys import Keys
from worker.marketplace import Marketplace, Payment

# Ledger states of one payment:
#   requested -> paid -> reserved -> sent -> spent
#                  ^--------+----------+  (returned to the pool: lease expired, or reconciled unspent)
#   requested -> unknown   (the purchase request timed out: no id to look up; counted as bought)
#   any       -> void      (the seller refused the token: expired, used or unknown to it)
_TAKE = """
local pid = redis.call('LPOP', KEYS[1])
if not pid then return false end
local pay = ARGV[3] .. pid
redis.call('HSET', pay, 'state', 'reserved', 'run_id', ARGV[4], 'updated_ms', ARGV[1])
redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) + tonumber(ARGV[2]), pid)
return {pid, redis.call('HGET', pay, 'token') or ''}
"""
# Only the transition into 'spent' charges, so a reconcile racing an answer cannot charge twice.
_SETTLE = """
if redis.call('HGET', KEYS[1], 'state') == 'spent' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'spent', 'request_id', ARGV[3], 'updated_ms', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'spent', 1)
redis.call('HINCRBY', KEYS[3], 'spent_cents', ARGV[2])
if KEYS[4] ~= '' then
  redis.call('HINCRBY', KEYS[4], 'calls', 1)
  redis.call('HINCRBY', KEYS[4], 'spend_cents', ARGV[2])
end
return 1
"""
QUOTE_TTL_S = 300.0


@dataclass(frozen=True)
class Token:
    """A token reserved for one call; the secret never shows in repr or logs."""

    payment_id: str
    amount_cents: int
    secret: str = field(repr=False)


class Wallet:
    """Buys, lends and reconciles payment tokens; one per worker process, thread-safe.

    The Redis client must be created with decode_responses=True.
    """

    def __init__(self, redis: Any, market: Marketplace, keys: Keys, *, max_price_cents: int,
                 lease_s: float = 120.0) -> None:
        self._redis = redis
        self._market = market
        self._keys = keys
        self._max_price = max_price_cents
        self._lease_ms = int(lease_s * 1000)
        self._take = redis.register_script(_TAKE)
        self._settle_script = redis.register_script(_SETTLE)
        self._quote_lock = threading.Lock()
        self._quote_checked_at = 0.0

    def take(self, run_id: str) -> Token:
        """A token from the pool if one waits there, else a new purchase (after the price guard)."""
        got = self._take(keys=[self._keys.pool(), self._keys.leases()],
                         args=[_now_ms(), self._lease_ms, self._keys.payment_prefix(), run_id])
        if got:
            pid, secret = str(got[0]), str(got[1])
            amount = int(self._redis.hget(self._keys.payment(pid), "amount_cents") or 0)
            return Token(pid, amount, secret)
        return self._buy(run_id)

    def release(self, token: Token) -> None:
        """Give back a token that never left this process (the call was not sent)."""
        self._return(token.payment_id)

    def sent(self, token: Token, identities: list[str]) -> None:
        """Written before the call leaves: a crash after this line is reconciled, never reused blindly."""
        now = _now_ms()
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._keys.payment(token.payment_id), mapping={
            "state": "sent", "images": json.dumps(identities), "updated_ms": now})
        pipe.zadd(self._keys.leases(), {token.payment_id: now + self._lease_ms})
        pipe.execute()

    def spent(self, token: Token, run_id: str, request_id: str | None) -> None:
        """The call was answered: the token is consumed and the run is charged."""
        self._settle(token.payment_id, run_id, token.amount_cents, request_id or "")

    def after_failure(self, token: Token, run_id: str) -> bool:
        """Ask the seller whether a failed call used the token; back to the pool if not. True if spent."""
        try:
            payment = self._market.get_payment(token.payment_id)
        except (TransientError, OutcomeUnknown):
            # Cannot tell now: leave it 'sent'; the lease sweep reconciles it later.
            return True
        return self._apply(token.payment_id, run_id, token.amount_cents, payment)

    def void(self, token: Token, run_id: str) -> None:
        """The seller refused the token outright; it can never be used again."""
        self._redis.hset(self._keys.payment(token.payment_id), mapping={"state": "void", "updated_ms": _now_ms()})
        self._redis.zrem(self._keys.leases(), token.payment_id)
        self._redis.hincrby(self._keys.wallet_totals(), "void", 1)

    def sweep(self) -> int:
        """Finish what dead workers left: expired reservations go back, expired 'sent' are reconciled."""
        due = self._redis.zrangebyscore(self._keys.leases(), "-inf", _now_ms())
        done = 0
        for raw in due:
            pid = str(raw)
            record: dict[str, str] = self._redis.hgetall(self._keys.payment(pid))
            state, run_id = record.get("state"), record.get("run_id", "")
            amount = int(record.get("amount_cents") or 0)
            if state == "reserved":
                self._return(pid)
                done += 1
            elif state == "sent":
                try:
                    payment = self._market.get_payment(pid)
                except (TransientError, OutcomeUnknown):
                    continue
                self._apply(pid, run_id, amount, payment)
                done += 1
            else:
                self._redis.zrem(self._keys.leases(), pid)
        if done:
            self._redis.hset(self._keys.wallet_totals(), "last_reconciled_ms", _now_ms())
        return done

    def totals(self) -> dict[str, int]:
        raw = self._redis.hgetall(self._keys.wallet_totals())
        totals = {k: int(v) for k, v in raw.items()}
        totals["pool"] = int(self._redis.llen(self._keys.pool()))
        return totals

    def _buy(self, run_id: str) -> Token:
        self._check_price()
        request_id = f"req-{uuid.uuid4().hex}"
        request_key = self._keys.payment(request_id)
        self._redis.hset(request_key, mapping={"state": "requested", "run_id": run_id, "created_ms": _now_ms()})
        try:
            payment = self._market.create_payment()
        except OutcomeUnknown:
            # No idempotency key and no id: the purchase may exist. Count it as bought, never repeat blindly.
            self._redis.hset(request_key, "state", "unknown")
            self._redis.hincrby(self._keys.wallet_totals(), "unknown_purchases", 1)
            raise
        except BaseException:
            self._redis.hset(request_key, "state", "failed")
            raise
        if payment.token is None:
            self._redis.hset(request_key, "state", "failed")
            raise TransientError(f"payment {payment.payment_id} answered without a token")
        amount = payment.amount_cents if payment.amount_cents is not None else self._max_price
        now = _now_ms()
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._keys.payment(payment.payment_id), mapping={
            "state": "reserved", "token": payment.token, "amount_cents": amount, "run_id": run_id,
            "expires_at": payment.expires_at or "", "created_ms": now, "updated_ms": now})
        pipe.zadd(self._keys.leases(), {payment.payment_id: now + self._lease_ms})
        pipe.hset(request_key, mapping={"state": "paid", "payment_id": payment.payment_id})
        pipe.expire(request_key, 7 * 24 * 3600)
        pipe.hincrby(self._keys.wallet_totals(), "bought", 1)
        pipe.hincrby(self._keys.wallet_totals(), "bought_cents", amount)
        pipe.execute()
        if amount > self._max_price:
            raise ConfigError(
                f"the seller charged {amount} cents per call; IRLIVE_MAX_PRICE_CENTS allows {self._max_price}"
            )
        return Token(payment.payment_id, amount, payment.token)

    def _check_price(self) -> None:
        with self._quote_lock:
            if time.monotonic() - self._quote_checked_at < QUOTE_TTL_S:
                return
            quote = self._market.quote()
            if quote.price_cents > self._max_price:
                raise ConfigError(
                    f"the seller asks {quote.price_cents} cents per call; IRLIVE_MAX_PRICE_CENTS allows "
                    f"{self._max_price}: raise it if that price is acceptable"
                )
            self._quote_checked_at = time.monotonic()

    def _apply(self, pid: str, run_id: str, amount: int, payment: Payment) -> bool:
        if payment.remaining_calls is not None and payment.remaining_calls > 0 and payment.status in (
                "paid", "pending", "unknown"):
            self._return(pid)
            self._redis.hincrby(self._keys.wallet_totals(), "reconciled_unspent", 1)
            return False
        if payment.status == "expired" and payment.remaining_calls:
            self.void(Token(pid, amount, ""), run_id)
            return False
        self._settle(pid, run_id, amount, "")
        self._redis.hincrby(self._keys.wallet_totals(), "reconciled_spent", 1)
        return True

    def _settle(self, pid: str, run_id: str, amount: int, request_id: str) -> None:
        run_key = self._keys.run(run_id) if run_id else ""
        self._settle_script(
            keys=[self._keys.payment(pid), self._keys.leases(), self._keys.wallet_totals(), run_key],
            args=[pid, amount, request_id, _now_ms()],
        )

    def _return(self, pid: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._keys.payment(pid), mapping={"state": "paid", "updated_ms": _now_ms()})
        pipe.zrem(self._keys.leases(), pid)
        pipe.rpush(self._keys.pool(), pid)
        pipe.execute()


def _now_ms() -> int:
    return int(time.time() * 1000)
