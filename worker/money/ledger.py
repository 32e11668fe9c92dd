"""Payment tokens and their ledger: every token's life is written down in Redis before each step happens."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from worker.errors import ConfigError, OutcomeUnknown, TransientError
from worker.keys import Keys
from worker.money.budgets import Budget
from worker.seams.marketplace import Marketplace, Payment
from worker.settle_lua import SETTLE_FN

# Ledger states of one payment (hash irlive:pay:<id>):
#   requested -> paid -> reserved -> sent -> spent   (spent is written with the call's verdicts: Runs.record)
#                 ^---------+----------+       returned to the pool: lease expired, or reconciled unspent
#   requested -> unknown   the purchase request timed out: no id to look up; counted as bought, never repeated
#   requested -> failed    the purchase certainly did not happen
#   paid/sent -> void      the seller refused the token (expired, used or unknown to it)
# A reserved token carries `committed`: its price is charged to the run's budget until it is spent or returned.

# Pop a live token and charge the run, in one step. Returns {1, pid, token, amount} | {0} (pool empty)
# | {-1} (budget would be crossed; the token stays in the pool).
_TAKE = """
local now = tonumber(ARGV[1])
while true do
  local pid = redis.call('LPOP', KEYS[1])
  if not pid then return {0} end
  local pay = ARGV[3] .. pid
  local expires = tonumber(redis.call('HGET', pay, 'expires_ms') or '0')
  if expires > 0 and expires <= now + tonumber(ARGV[5]) then
    redis.call('HSET', pay, 'state', 'void', 'void_reason', 'expired in pool', 'updated_ms', ARGV[1])
    redis.call('HINCRBY', KEYS[4], 'expired_in_pool', 1)
  else
    local amount = tonumber(redis.call('HGET', pay, 'amount_cents') or '0')
    local cap = redis.call('HGET', KEYS[3], 'budget_cents')
    local committed = tonumber(redis.call('HGET', KEYS[3], 'committed_cents') or '0')
    if cap and cap ~= '' and committed + amount > tonumber(cap) then
      redis.call('LPUSH', KEYS[1], pid)
      return {-1}
    end
    redis.call('HINCRBY', KEYS[3], 'committed_cents', amount)
    redis.call('HSET', pay, 'state', 'reserved', 'run_id', ARGV[4], 'committed', '1', 'updated_ms', ARGV[1])
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), pid)
    return {1, pid, redis.call('HGET', pay, 'token') or '', amount}
  end
end
"""
# Back to the pool (never sent, or reconciled unspent), giving the run its commitment back.
_RETURN = """
local pay = KEYS[1]
local state = redis.call('HGET', pay, 'state')
if state ~= 'reserved' and state ~= 'sent' then return 0 end
if redis.call('HGET', pay, 'committed') == '1' then
  local run = redis.call('HGET', pay, 'run_id')
  if run and run ~= '' then
    redis.call('HINCRBY', ARGV[2] .. run, 'committed_cents', -tonumber(redis.call('HGET', pay, 'amount_cents') or '0'))
  end
end
redis.call('HSET', pay, 'state', 'paid', 'committed', '0', 'updated_ms', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[1])
return 1
"""
_SETTLE = SETTLE_FN + """
return settle(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
"""
QUOTE_TTL_S = 300.0
PENDING_WAIT_S = 20.0
PENDING_POLL_S = 0.5
# A pool token closer than this to its expiry is not handed out: the call might outlive it.
EXPIRY_MARGIN_MS = 60_000


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

    def __init__(self, redis: Any, market: Marketplace, keys: Keys, budget: Budget, *, max_price_cents: int,
                 lease_s: float = 120.0) -> None:
        self._redis = redis
        self._market = market
        self._keys = keys
        self._budget = budget
        self._max_price = max_price_cents
        self._lease_ms = int(lease_s * 1000)
        self._take = redis.register_script(_TAKE)
        self._return_script = redis.register_script(_RETURN)
        self._settle_script = redis.register_script(_SETTLE)
        self._quote_lock = threading.Lock()
        self._quote_checked_at = -QUOTE_TTL_S
        self._price = max_price_cents
        self.last_take_at = 0.0

    def take(self, run_id: str) -> Token:
        """A token from the pool if one waits there, else a new purchase; either way charged to the run."""
        self.last_take_at = time.monotonic()
        got = self._take(
            keys=[self._keys.pool(), self._keys.leases(), self._keys.run(run_id), self._keys.wallet_totals()],
            args=[_now_ms(), self._lease_ms, self._keys.payment_prefix(), run_id, EXPIRY_MARGIN_MS],
        )
        if int(got[0]) == 1:
            return Token(str(got[1]), int(got[3]), str(got[2]))
        if int(got[0]) == -1:
            raise self._budget.run_exhausted(run_id)
        return self._buy(run_id, for_pool=False)

    def refill(self, target: int) -> int:
        """Buy tokens into the pool until it holds `target`; returns how many were bought."""
        bought = 0
        while int(self._redis.llen(self._keys.pool())) < target:
            token = self._buy("", for_pool=True)
            self._redis.rpush(self._keys.pool(), token.payment_id)
            bought += 1
        return bought

    def release(self, token: Token) -> None:
        """Give back a token that never left this process (the call was not sent)."""
        self._return(token.payment_id)

    def sent(self, token: Token, identities: list[str]) -> None:
        """Written before the call leaves: a crash after this line is reconciled, never reused blindly."""
        now = _now_ms()
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._keys.payment(token.payment_id), mapping={
            "state": "sent", "images": ",".join(identities), "updated_ms": now})
        pipe.zadd(self._keys.leases(), {token.payment_id: now + self._lease_ms})
        pipe.execute()

    def after_failure(self, token: Token, run_id: str) -> bool:
        """Ask the seller whether a failed call used the token; back to the pool if not. True if spent."""
        try:
            payment = self._market.get_payment(token.payment_id)
        except (TransientError, OutcomeUnknown):
            # Cannot tell now: leave it 'sent'; the lease sweep reconciles it later.
            return True
        return self._apply(token.payment_id, run_id, token.amount_cents, payment)

    def void(self, token: Token, run_id: str) -> None:
        """The seller refused the token outright; it can never be used again (its price stays charged)."""
        self._settle(token.payment_id, run_id, token.amount_cents, "", "void")

    def sweep(self, *, everything: bool = False) -> int:
        """Finish what dead workers left: expired reservations go back, expired 'sent' are reconciled,
        purchases that never got an answer are counted as unknown.

        everything=True ignores leases: only safe when no worker is running.
        """
        limit = "+inf" if everything else _now_ms()
        done = self._settle_open(self._redis.zrangebyscore(self._keys.leases(), "-inf", limit))[0]
        done += self._expire_requests("+inf" if everything else _now_ms() - self._lease_ms)
        self._redis.hset(self._keys.wallet_totals(), "last_reconciled_ms", _now_ms())
        return done

    def settle_run(self, run_id: str) -> int:
        """Settle every open token of a run whose chunks are all complete; returns how many stay unsettled."""
        mine = [pid for pid in self._redis.zrange(self._keys.leases(), 0, -1)
                if self._redis.hget(self._keys.payment(pid), "run_id") == run_id]
        return self._settle_open(mine)[1]

    def _settle_open(self, pids: list[str]) -> tuple[int, int]:
        """(settled, left open) for tokens reserved or sent: back to the pool, or reconciled with the seller."""
        done = left = 0
        for pid in pids:
            record: dict[str, str] = self._redis.hgetall(self._keys.payment(pid))
            state, run_id = record.get("state"), record.get("run_id", "")
            if state == "reserved":
                self._return(pid)
            elif state == "sent":
                try:
                    payment = self._market.get_payment(pid)
                except (TransientError, OutcomeUnknown):
                    left += 1
                    continue
                self._apply(pid, run_id, int(record.get("amount_cents") or 0), payment)
            else:
                self._redis.zrem(self._keys.leases(), pid)
                continue
            done += 1
        return done, left

    def _expire_requests(self, older_than: float | str) -> int:
        """A purchase request with no recorded answer: the worker died mid-request. It may have been paid."""
        expired = 0
        for rid in self._redis.zrangebyscore(self._keys.requests(), "-inf", older_than):
            key = self._keys.payment(rid)
            record: dict[str, str] = self._redis.hgetall(key)
            if record.get("state") == "requested":
                self._redis.hset(key, "state", "unknown")
                self._redis.hincrby(self._keys.wallet_totals(), "unknown_purchases", 1)
                if record.get("run_id"):
                    self._budget.release_run(record["run_id"], int(record.get("price_cents") or 0))
                expired += 1
            self._redis.zrem(self._keys.requests(), rid)
        return expired

    def totals(self) -> dict[str, int]:
        raw: dict[str, str] = self._redis.hgetall(self._keys.wallet_totals())
        totals = {k: int(v) for k, v in raw.items()}
        totals["pool"] = int(self._redis.llen(self._keys.pool()))
        totals["in_flight"] = int(self._redis.zcard(self._keys.leases()))
        totals["spent_today_cents"] = self._budget.spent_today()
        return totals

    def _buy(self, run_id: str, *, for_pool: bool) -> Token:
        price = self._check_price()
        if run_id:
            self._budget.commit_run(run_id, price)
        request_id = f"req-{uuid.uuid4().hex}"
        request_key = self._keys.payment(request_id)
        try:
            self._budget.commit_day(price)
            now = _now_ms()
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(request_key, mapping={"state": "requested", "run_id": run_id, "price_cents": price,
                                            "created_ms": now})
            pipe.zadd(self._keys.requests(), {request_id: now})
            pipe.execute()
            payment = self._market.create_payment()
        except OutcomeUnknown:
            # No idempotency key and no id: the purchase may exist. Count it as bought, never repeat blindly.
            self._redis.hset(request_key, "state", "unknown")
            self._redis.zrem(self._keys.requests(), request_id)
            self._redis.hincrby(self._keys.wallet_totals(), "unknown_purchases", 1)
            if run_id:
                self._budget.release_run(run_id, price)
            raise
        except BaseException:
            if self._redis.hget(request_key, "state") == "requested":
                self._redis.hset(request_key, "state", "failed")
                self._redis.zrem(self._keys.requests(), request_id)
                self._budget.release_day(price)
            if run_id:
                self._budget.release_run(run_id, price)
            raise
        amount = payment.amount_cents if payment.amount_cents is not None else price
        now = _now_ms()
        state = "paid" if for_pool else "reserved"
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._keys.payment(payment.payment_id), mapping={
            "state": state, "token": payment.token or "", "amount_cents": amount, "run_id": run_id,
            "committed": "1" if run_id else "0", "expires_ms": _parse_ms(payment.expires_at),
            "created_ms": now, "updated_ms": now})
        if not for_pool:
            pipe.zadd(self._keys.leases(), {payment.payment_id: now + self._lease_ms})
        pipe.hset(request_key, mapping={"state": "paid", "payment_id": payment.payment_id})
        pipe.zrem(self._keys.requests(), request_id)
        pipe.expire(request_key, 7 * 24 * 3600)
        pipe.hincrby(self._keys.wallet_totals(), "bought", 1)
        pipe.hincrby(self._keys.wallet_totals(), "bought_cents", amount)
        if run_id:
            pipe.hincrby(self._keys.run(run_id), "tokens_bought", 1)
            pipe.hincrby(self._keys.run(run_id), "committed_cents", amount - price)
        pipe.execute()
        if amount > self._max_price:
            raise ConfigError(
                f"the seller charged {amount} cents per call; IRLIVE_MAX_PRICE_CENTS allows {self._max_price}"
            )
        if payment.token is None:
            self.void(Token(payment.payment_id, amount, ""), run_id)
            raise TransientError(f"payment {payment.payment_id} answered without a token")
        token = Token(payment.payment_id, amount, payment.token)
        if payment.status == "pending":
            self._await_paid(token, run_id)
        return token

    def _await_paid(self, token: Token, run_id: str) -> None:
        """A payment not settled yet: poll it (never buy another) until it is paid or has expired."""
        deadline = time.monotonic() + PENDING_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(PENDING_POLL_S)
            status = self._market.get_payment(token.payment_id).status
            if status == "paid":
                return
            if status in ("expired", "exhausted"):
                self.void(token, run_id)
                raise TransientError(f"payment {token.payment_id} ended {status} before it was paid")
        # Still pending: leave it in the pool for a later call rather than hold this one up further.
        self.release(token)
        raise TransientError(f"payment {token.payment_id} still pending after {PENDING_WAIT_S:.0f}s")

    def _check_price(self) -> int:
        """Read the seller's price from its 402 answer (cached); refuse above IRLIVE_MAX_PRICE_CENTS."""
        with self._quote_lock:
            if time.monotonic() - self._quote_checked_at < QUOTE_TTL_S:
                return self._price
            quote = self._market.quote()
            if quote.price_cents > self._max_price:
                raise ConfigError(
                    f"the seller asks {quote.price_cents} cents per call; IRLIVE_MAX_PRICE_CENTS allows "
                    f"{self._max_price}: raise it if that price is acceptable"
                )
            self._price = quote.price_cents
            self._quote_checked_at = time.monotonic()
            return self._price

    def _apply(self, pid: str, run_id: str, amount: int, payment: Payment) -> bool:
        if payment.remaining_calls and payment.status not in ("expired", "exhausted"):
            self._return(pid)
            self._redis.hincrby(self._keys.wallet_totals(), "reconciled_unspent", 1)
            return False
        if payment.status == "expired" and payment.remaining_calls:
            self._settle(pid, run_id, amount, "", "void")
            return False
        self._settle(pid, run_id, amount, "", "spent")
        self._redis.hincrby(self._keys.wallet_totals(), "reconciled_spent", 1)
        return True

    def _settle(self, pid: str, run_id: str, amount: int, request_id: str, state: str) -> None:
        run_key = self._keys.run(run_id) if run_id else ""
        self._settle_script(
            keys=[self._keys.payment(pid), self._keys.leases(), self._keys.wallet_totals(), run_key],
            args=[pid, amount, request_id, _now_ms(), state],
        )

    def _return(self, pid: str) -> None:
        self._return_script(keys=[self._keys.payment(pid), self._keys.leases(), self._keys.pool()],
                            args=[pid, self._keys.run(""), _now_ms()])


def _now_ms() -> int:
    return int(time.time() * 1000)


def _parse_ms(iso: str | None) -> int:
    if not iso:
        return 0
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return 0
